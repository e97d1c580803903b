"""The one exception type the grammar engine raises for bad user input.

It subclasses ValueError so callers (the server) can map it to HTTP 400 without importing
grammar internals; the message names the offending keyword, construct or position.
"""


class GrammarError(ValueError):
    """A grammar, JSON schema, regex or structural tag that cannot be compiled as given."""
