"""`treadle serve` configuration layering: EngineConfig < configs/<device>.yaml < --config FILE < flags."""

from __future__ import annotations

import pytest

from treadle.server.cli import build_parser, serve_config_from_args
from treadle.server.serve_config import ConfigError, build_serve_config


def parse(*argv: str):
    return serve_config_from_args(build_parser().parse_args(["serve", *argv]))


def test_cpu_defaults_come_from_the_packaged_yaml(monkeypatch):
    monkeypatch.delenv("TREADLE_API_KEY", raising=False)
    cfg = parse("--device", "cpu")
    assert (cfg.host, cfg.port, cfg.api_key) == ("127.0.0.1", 8000, None)
    e = cfg.engine
    assert (e.device, e.dtype, e.page_size, e.kv_cache_gb, e.max_num_seqs, e.max_num_batched_tokens) == (
        "cpu", "bfloat16", 16, 2.0, 64, 1024)
    assert e.num_pages is None and e.model is None and e.enable_prefix_caching


def test_cuda_defaults_differ():
    e = build_serve_config({"device": "cuda:1"}).engine
    assert e.device == "cuda:1" and e.dtype == "bfloat16" and e.max_num_batched_tokens > 1024


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("device: cpu\nmax_num_seqs: 8\npage_size: 32\nport: 9000\n")
    cfg = parse("--config", str(path), "--max-num-seqs", "4", "--no-prefix-caching", "--served-model-name", "m")
    e = cfg.engine
    assert (e.max_num_seqs, e.page_size, cfg.port, e.served_model_name) == (4, 32, 9000, "m")
    assert e.enable_prefix_caching is False and e.max_num_batched_tokens == 1024


def test_a_pool_size_given_later_replaces_num_pages(tmp_path):
    path = tmp_path / "pages.yaml"
    path.write_text("device: cpu\nnum_pages: 100\n")
    assert parse("--config", str(path)).engine.num_pages == 100
    cfg = parse("--config", str(path), "--kv-cache-gb", "0.5")
    assert cfg.engine.num_pages is None and cfg.engine.kv_cache_gb == 0.5


def test_pool_flags_are_exclusive_and_device_specific():
    with pytest.raises(SystemExit):
        parse("--num-pages", "4", "--kv-cache-gb", "1")
    with pytest.raises(ConfigError, match="on CPU use --kv-cache-gb"):
        parse("--device", "cpu", "--kv-memory-fraction", "0.5")
    with pytest.raises(ConfigError, match="on CUDA use --kv-memory-fraction"):
        parse("--device", "cuda", "--kv-cache-gb", "1")


def test_api_key_from_environment_unless_given(monkeypatch):
    monkeypatch.setenv("TREADLE_API_KEY", "from-env")
    assert parse("--device", "cpu").api_key == "from-env"
    assert parse("--device", "cpu", "--api-key", "flag").api_key == "flag"


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_num_seq: 8\n", "unknown option.*max_num_seq"),
        ("page_size: sixteen\n", "option page_size"),
        ("- a list\n", "expected a mapping"),
        ("port: 70000\n", "option port"),
        ("grammar_workers: -1\n", "option grammar_workers: must be 0 or more"),
        ("key: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text("device: cpu\n" + text if not text.startswith("-") else text)
    with pytest.raises(ConfigError, match=message):
        parse("--device", "cpu", "--config", str(path))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse("--device", "cpu", "--config", "/nonexistent/treadle.yaml")


def test_bench_serve_subcommand_is_wired(capsys):
    from treadle.server.cli import main

    # Port 9 (discard) is closed on a test box: the load generator runs and reports the unreachable server.
    assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1", "--disable-tqdm"]) == 2
    assert "treadle bench serve" in capsys.readouterr().out
