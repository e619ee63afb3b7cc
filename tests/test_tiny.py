"""The miniature Llama (editlib.tiny): the committed ``models/tiny-world`` and a small training run.

Single-threaded (``one_thread`` from ``_fixtures``): on 2 busy cores, intra-op threads make these
small forward passes many times slower.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch
from _fixtures import one_thread  # noqa: F401  (autouse, module scope)

import editlib.tiny as tiny
from editlib.counterfact import sample
from editlib.records import records_sha256
from editlib.models import load_model
from editlib.tiny import (
    COMMITTED_MINIATURE,
    TinyConfig,
    fact_quality,
    fact_units,
    load_tiny_records,
    passes_bar,
    train_tokenizer,
)
from editlib.tokens import bos_offset, encode, target_ids, with_space
from editlib.world import make_world

QUALITY_KEYS = [f"{f}_{m}" for f in ("rewrite", "paraphrase", "neighborhood")
                for m in ("true_beats_new", "true_top1")]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

#: a training run small enough for a test (< 15 s on 2 busy cores); the last three are TinyConfig
#: fields that the CLI must accept for the model card's rebuild command to work
SMOKE = dict(max_steps=30, check_every=30, vocab_size=600, hidden=32, intermediate=64, batch_rows=8)
SMOKE_LAYERS = 2


def rebuild_command(model_dir: Path) -> str:
    """The command line under "Rebuild exactly with:" in a miniature's README.md."""
    lines = (model_dir / "README.md").read_text().splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("Rebuild exactly with"))
    return next(line.strip() for line in lines[i + 1:] if line.strip())


# --------------------------------------------------------------------------- the committed miniature

@pytest.fixture(scope="module")
def mini(monkeypatch_module) -> tuple:
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    return load_model(str(COMMITTED_MINIATURE))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def mini_records():
    return load_tiny_records(COMMITTED_MINIATURE)


def test_committed_folder_contents() -> None:
    d = COMMITTED_MINIATURE
    assert d == Path(tiny.__file__).resolve().parent.parent / "models" / "tiny-world"
    for name in ("README.md", "editlib_tiny.json", "records.json", "config.json", "model.safetensors",
                 *TOKENIZER_FILES):
        assert (d / name).is_file(), name
    assert not (d / "case_ids.json").exists()
    readme = (d / "README.md").read_text()
    assert "python -m editlib tiny-train" in readme
    meta = json.loads((d / "editlib_tiny.json").read_text())
    assert rebuild_command(d) == meta["command"]
    assert meta["command"].startswith("python -m editlib tiny-train --world ")
    assert meta["records"] == "records.json"
    assert meta["passes_bar"] is True and passes_bar(meta["quality"])
    assert set(meta["config"]) == {f.name for f in fields(TinyConfig)}


def test_committed_config() -> None:
    cfg = json.loads((COMMITTED_MINIATURE / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] >= 6
    assert cfg["tie_word_embeddings"] is False
    meta = json.loads((COMMITTED_MINIATURE / "editlib_tiny.json").read_text())
    assert cfg["num_hidden_layers"] == meta["config"]["n_layers"]
    assert cfg["hidden_size"] == meta["config"]["hidden"]
    assert cfg["intermediate_size"] == meta["config"]["intermediate"]


def test_committed_records(mini_records) -> None:
    meta = json.loads((COMMITTED_MINIATURE / "editlib_tiny.json").read_text())
    assert len(mini_records) == meta["n_records"]
    # a world build: the records are make_world(n, seed) exactly
    assert mini_records == make_world(meta["n_records"], meta["config"]["seed"])


def test_committed_loads_offline(mini) -> None:
    model, tok = mini
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config.num_hidden_layers >= 6 and not model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    assert tok.bos_token == "<s>" and bos_offset(tok) == 1
    assert encode(tok, "Paris")[0] == tok.bos_token_id
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "right"
    assert len(tok) == model.config.vocab_size


def test_committed_target_words_are_single_tokens(mini, mini_records) -> None:
    tok = mini[1]
    words = {r.target_true.str for r in mini_records} | {r.target_new.str for r in mini_records}
    multi = sorted(w for w in words if len(target_ids(tok, w)) != 1)
    assert not multi


def test_committed_quality_bar(mini, mini_records) -> None:
    """The quality bar, measured on 300 records (the first 300 of the seeded ordering 0)."""
    model, tok = mini
    recs = sample(mini_records, 300)
    assert len({r.case_id for r in recs}) == 300
    q = fact_quality(model, tok, recs)
    assert sorted(q) == sorted(QUALITY_KEYS)
    for k in QUALITY_KEYS:
        bar = 0.95 if k.startswith("rewrite") else 0.90
        assert q[k] >= bar, (k, q[k])
    assert passes_bar(q)


# --------------------------------------------------------------------------- pure helpers

def test_passes_bar_thresholds() -> None:
    q = {k: (0.95 if k.startswith("rewrite") else 0.90) for k in QUALITY_KEYS}
    assert passes_bar(q)
    for k in QUALITY_KEYS:
        assert not passes_bar({**q, k: q[k] - 1e-6}), k
    assert passes_bar({**q, "rewrite_true_top1": 0.8}, rewrite=0.8)
    assert not passes_bar(q, other=0.91)


def test_fact_units() -> None:
    recs = make_world(20, seed=1)
    units = fact_units(recs)
    assert len(units) == len(set(units))
    assert fact_units(recs + recs) == units  # deduplicated, order kept
    expected = {p + with_space(r.target_true.str)
                for r in recs for p in (r.rewrite_prompt, *r.paraphrase_prompts, *r.neighborhood_prompts)}
    assert set(units) == expected
    trues = {with_space(r.target_true.str) for r in recs}
    assert all(any(u.endswith(t) for t in trues) for u in units)
    for r in recs:
        assert r.rewrite_prompt + with_space(r.target_true.str) in units
        assert r.rewrite_prompt + with_space(r.target_new.str) not in units
        assert all("{}" not in u for u in units)


def test_train_tokenizer_single_token_check() -> None:
    recs = make_world(20, seed=1)
    texts = fact_units(recs)
    words = sorted({r.target_true.str for r in recs})
    with pytest.raises(ValueError, match="vocab_size=300 leaves .* multi-token"):
        train_tokenizer(texts, 300, must_be_single=words)
    tok = train_tokenizer(texts * 2, 2000, must_be_single=words)
    assert all(len(tok(with_space(w), add_special_tokens=False)["input_ids"]) == 1 for w in words)
    assert tok("Paris")["input_ids"][0] == tok.bos_token_id == tok.convert_tokens_to_ids("<s>")
    assert tok.eos_token == "</s>"


def test_source_records_and_errors(tmp_path: Path) -> None:
    assert tiny.source_records("world", 7, seed=2) == make_world(7, 2)
    with pytest.raises(ValueError, match="'world' or 'counterfact'"):
        tiny.source_records("wiki", 7)
    with pytest.raises(FileNotFoundError, match="not an editlib miniature"):
        load_tiny_records(tmp_path)


# --------------------------------------------------------------------------- a small training run

def build_smoke(source: str, n_records: int, out: Path, **kw) -> Path:
    """A miniature at the smoke sizes, trained single-threaded."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "set_num_threads", lambda n: None)  # keep the test single-threaded
        return tiny.build_tiny(source, n_records, out, n_layers=SMOKE_LAYERS, log=lambda *a: None, **SMOKE, **kw)


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    import time

    out = tmp_path_factory.mktemp("tiny") / "m"
    t0 = time.perf_counter()
    path = build_smoke("world", 40, out)
    return path, time.perf_counter() - t0


def test_build_tiny_smoke(smoke_build, monkeypatch: pytest.MonkeyPatch) -> None:
    path, seconds = smoke_build
    assert seconds < 15, f"the smoke build took {seconds:.1f} s"
    assert path.is_dir() and not list(path.parent.glob(".m.*"))  # temp dir renamed away
    for name in ("README.md", "editlib_tiny.json", "records.json", "config.json", "model.safetensors",
                 *TOKENIZER_FILES):
        assert (path / name).is_file(), name
    meta = json.loads((path / "editlib_tiny.json").read_text())
    assert meta["steps"] == 30 and meta["n_records"] == 40
    assert meta["config"] == asdict(TinyConfig(n_layers=SMOKE_LAYERS, seed=0, **SMOKE))
    assert set(meta["quality"]) == set(QUALITY_KEYS)
    assert load_tiny_records(path) == make_world(40, 0)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model(str(path))
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == SMOKE_LAYERS
    assert model.config.hidden_size == 32 and model.config.tie_word_embeddings is False
    assert bos_offset(tok) == 1 and encode(tok, "Paris")[0] == tok.bos_token_id == model.config.bos_token_id
    assert tok.pad_token_id == tok.eos_token_id == model.config.eos_token_id
    # the true target words occur in the training text; the tokenizer knows them
    assert all(target_ids(tok, r.target_true.str) for r in load_tiny_records(path))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encode(tok, "The capital of France is")])).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()


def test_a_counterfact_miniature_reads_only_the_records_it_learnt(tmp_path: Path) -> None:
    """A CounterFact miniature keeps only its case_ids, and the digest of the records it was trained
    on: read back from its own file they are those records; from a file whose records of those ids
    differ (another version, an edited copy) it is refused, naming the remedy."""
    from editlib.counterfact import save_records
    from editlib.records import RecordError

    world = make_world(60, 1)  # CounterFact's schema
    cf = save_records(world, tmp_path / "cf.json")
    path = build_smoke("counterfact", 40, tmp_path / "m", counterfact_path=str(cf))
    assert (path / "case_ids.json").is_file() and not (path / "records.json").exists()
    want = sample(world, 40)
    assert load_tiny_records(path, str(cf)) == want
    meta = json.loads((path / "editlib_tiny.json").read_text())
    assert meta["records_sha256"] == records_sha256(want)
    i = [r.case_id for r in world].index(want[3].case_id)
    other = [*world]
    other[i] = replace(other[i], target_true=replace(other[i].target_true, str=other[i].target_true.str + "s"))
    cf2 = save_records(other, tmp_path / "cf2.json")
    with pytest.raises(RecordError, match="trained on other records for its case_ids"):
        load_tiny_records(path, str(cf2))
    unrelated = [r for j, r in enumerate(other) if j != i]  # the edited record's id only in cf2
    assert load_tiny_records(path, str(save_records([*unrelated, world[i]], tmp_path / "cf3.json"))) == want


def test_build_tiny_readme_command(smoke_build) -> None:
    path, _ = smoke_build
    readme = (path / "README.md").read_text()
    cmd = (f"python -m editlib tiny-train --world 40 --seed 0 --layers {SMOKE_LAYERS} "
           + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items()) + f" --out {path}")
    assert cmd in readme
    assert rebuild_command(path) == cmd == json.loads((path / "editlib_tiny.json").read_text())["command"]


@pytest.mark.parametrize("which", ["committed", "smoke"])
def test_readme_command_rebuilds_the_same_config(which: str, smoke_build,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The command in the model card, run through the real CLI, asks build_tiny for exactly the
    recorded source, size, seed, layers and TinyConfig (training itself is replaced)."""
    from editlib.__main__ import main

    path = COMMITTED_MINIATURE if which == "committed" else smoke_build[0]
    meta = json.loads((path / "editlib_tiny.json").read_text())
    argv = shlex.split(rebuild_command(path))
    assert argv[:4] == ["python", "-m", "editlib", "tiny-train"]
    calls = []

    def fake_build(source, n, out, *, seed=0, n_layers=6, counterfact_path=None, log=print, **overrides):
        calls.append((source, n, str(out), seed, asdict(TinyConfig(n_layers=n_layers, seed=seed, **overrides))))
        return path

    monkeypatch.setattr(tiny, "build_tiny", fake_build)
    rc = main(argv[3:])
    assert rc == (0 if meta["passes_bar"] else 1)
    out = argv[argv.index("--out") + 1]
    assert calls == [("world", meta["n_records"], out, meta["config"]["seed"], meta["config"])]


def test_cli_accepts_every_tiny_config_field() -> None:
    """build_tiny puts each override into the rebuild command as --field-name VALUE: every field
    parses back to the value given (not the default), with its type."""
    from editlib.__main__ import build_parser

    parser = build_parser()
    for f in fields(TinyConfig):
        if f.name in ("n_layers", "seed"):  # --layers / --seed
            continue
        value = f.default * 2 + 1 if isinstance(f.default, int) else f.default * 3 + 0.25
        a = parser.parse_args(["tiny-train", "--world", "5", "--out", "x",
                               f"--{f.name.replace('_', '-')}", str(value)])
        got = getattr(a, f.name)
        assert got == value and got != f.default and type(got) is type(f.default), f.name


def test_ensure_tiny_passes_max_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A params ``tiny: {..., max_steps: N}`` reaches the training cap; without it the default is kept."""
    calls = []
    monkeypatch.setenv("EDITLIB_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny, "find_committed", lambda *a: None)
    monkeypatch.setattr(tiny, "build_tiny", lambda *a, **kw: calls.append(kw))
    tiny.ensure_tiny("counterfact", 5000, max_steps=8000, log=lambda *a: None)
    tiny.ensure_tiny("counterfact", 5000, log=lambda *a: None)
    assert calls[0]["max_steps"] == 8000 and "max_steps" not in calls[1]


def test_find_committed_picks_only_the_miniature_built_with_these_settings(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A committed miniature is reused only when its source, record count, depth and seed all match."""
    def card(name: str, cmd: str, n: int, layers: int, seed: int) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "editlib_tiny.json").write_text(json.dumps(
            {"command": cmd, "n_records": n, "config": {"n_layers": layers, "seed": seed}}))
        return tmp_path / name

    card("a-cf", "python -m editlib tiny-train --counterfact 1000", 1000, 4, 0)
    card("b-seed1", "python -m editlib tiny-train --world 1000", 1000, 4, 1)
    card("c-6l", "python -m editlib tiny-train --world 1000", 1000, 6, 0)
    want = card("d-world", "python -m editlib tiny-train --world 1000", 1000, 4, 0)
    monkeypatch.setattr(tiny, "REPO_MODELS", tmp_path)
    assert tiny.find_committed("world", 1000, 4, 0) == want
    assert tiny.find_committed("counterfact", 1000, 4, 0) == tmp_path / "a-cf"
    assert tiny.find_committed("world", 1000, 4, 2) is None and tiny.find_committed("world", 999, 4, 0) is None
