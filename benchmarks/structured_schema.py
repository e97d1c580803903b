"""The JSON schema of the structured-output benchmarks (structured_overhead.py, structured_step.py, and the fresh
walks of grammar_bench.py): an array of at least 200 small objects with keys, a bounded string, an integer range
and an enum, so masks change every few tokens and the output cannot end early."""

SCHEMA = {
    "type": "array",
    "minItems": 200,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "editor", "viewer"]},
        },
        "required": ["name", "age", "role"],
    },
}
