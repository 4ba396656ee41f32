"""A consolidated folder that Hugging Face loads as it is: ``zero-ckpt consolidate
--hf-config-from`` for a tiny Llama and a tiny GPT-2 (tied embeddings), trained a couple of
steps with ``ZeroOptimizer`` at world size 1 and saved with ``zero_ckpt.save``.

Checked against what transformers itself does: ``AutoModelForCausalLM.from_pretrained(out)``
gives the trained model's logits exactly (fp32), reports no missing, unexpected or mismatched
keys (its loading info and its log), and the safetensors file has the same size as
``save_pretrained``'s (a tied weight stored once, under the name HF keeps). Tiny configs built
here, CPU only, nothing downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

import zero_ckpt  # noqa: E402
from cli.main import cli  # noqa: E402
from zero_ckpt.consolidation import tied_names_for  # noqa: E402
from zero_ckpt.manifest import Manifest  # noqa: E402
from zero_core import ZeroOptimizer  # noqa: E402

VOCAB = 128


def _llama():
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {"llama": _llama, "gpt2": _gpt2}


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module", params=sorted(MODELS))
def trained(request, tmp_path_factory):
    """``(name, model, ckpt, cfg_dir, ref_dir)``: a model trained 2 steps with ZeroOptimizer,
    its zero-ckpt checkpoint, a folder with only its config/generation/tokenizer files, and
    ``save_pretrained``'s folder for comparison."""
    name = request.param
    torch.manual_seed(0)
    model = MODELS[name]()
    opt = ZeroOptimizer(model.named_parameters(), torch.optim.AdamW, stage=2, lr=1e-2)
    ids = _inputs()
    for _ in range(2):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        opt.backward(loss)
        opt.step()
    model.eval()
    root = tmp_path_factory.mktemp(name)
    zero_ckpt.save(str(root / "ckpt"), optimizer=opt, model=model)
    model.config.save_pretrained(root / "cfg")
    model.generation_config.save_pretrained(root / "cfg")
    _tokenizer().save_pretrained(root / "cfg")
    model.save_pretrained(root / "ref")
    return name, model, root / "ckpt", root / "cfg", root / "ref"


def _consolidate(*args) -> None:
    result = CliRunner().invoke(cli, ["consolidate", *[str(a) for a in args]], env={"ZERO_CKPT_DEBUG": ""})
    assert result.exit_code == 0, result.output


def _load(out: Path, dtype=None):
    """from_pretrained with its loading info and transformers' log captured."""
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = transformers.utils.logging.get_logger("transformers")
    handler = Grab(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(out), output_loading_info=True, **({"dtype": dtype} if dtype else {})
        )
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, records


def _no_key_problems(info: dict, records: list[str]) -> None:
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    text = "\n".join(records).lower()
    for word in ("missing", "unexpected", "newly initialized", "mismatch"):
        assert word not in text, records


def _digests(folder: Path, names) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def test_from_pretrained_gives_the_trained_logits_and_no_key_warnings(trained, tmp_path: Path) -> None:
    name, model, ckpt, cfg, ref = trained
    before = _digests(ckpt, [str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()])
    out = tmp_path / "out"
    _consolidate(ckpt, out, "--hf-config-from", cfg)
    loaded, info, records = _load(out)
    _no_key_problems(info, records)
    ids = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # config, generation and tokenizer files are there, byte for byte
    copied = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert _digests(out, copied) == _digests(cfg, copied)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("t3 t7")["input_ids"] == [3, 7]
    # the source checkpoint is untouched
    assert _digests(ckpt, before) == before


def test_safetensors_size_equals_save_pretrained(trained, tmp_path: Path) -> None:
    name, model, ckpt, cfg, ref = trained
    out = tmp_path / "out"
    _consolidate(ckpt, out, "--hf-config-from", cfg)
    from safetensors import safe_open

    with safe_open(str(ref / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
    assert (out / "model.safetensors").stat().st_size == (ref / "model.safetensors").stat().st_size
    # laid out as safetensors lays it out: the very same bytes
    assert _digests(out, ["model.safetensors"]) == _digests(ref, ["model.safetensors"])


def test_gpt2_tied_embedding_written_once_under_the_name_hf_keeps(trained, tmp_path: Path) -> None:
    name, model, ckpt, cfg, ref = trained
    if name != "gpt2":
        pytest.skip("tied embeddings: GPT-2")
    from safetensors import safe_open

    out, every = tmp_path / "out", tmp_path / "every"
    _consolidate(ckpt, out, "--hf-config-from", cfg)
    _consolidate(ckpt, every, "--hf-config-from", cfg, "--all-tied-names")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    with safe_open(str(every / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("transformer.wte.weight"))
    wte = model.transformer.wte.weight
    extra = wte.numel() * wte.element_size()
    assert (every / "model.safetensors").stat().st_size > (out / "model.safetensors").stat().st_size + extra - 64
    loaded, info, records = _load(every)  # every name: still loads cleanly
    _no_key_problems(info, records)


def test_bfloat16_export_matches_save_pretrained_of_the_bf16_model(trained, tmp_path: Path) -> None:
    name, model, ckpt, cfg, ref = trained
    out = tmp_path / "out"
    _consolidate(ckpt, out, "--hf-config-from", cfg, "--dtype", "bfloat16")
    bf16 = MODELS[name]()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    bf16.save_pretrained(tmp_path / "ref16")
    assert (out / "model.safetensors").stat().st_size == (tmp_path / "ref16" / "model.safetensors").stat().st_size
    loaded, info, records = _load(out, dtype=torch.bfloat16)
    _no_key_problems(info, records)
    want = bf16.state_dict()
    for key, value in loaded.state_dict().items():  # the weights; logits would also compare
        assert torch.equal(value, want[key]), key  # how each builds its bf16 rotary buffers


def test_sharded_export_loads_with_its_index(trained, tmp_path: Path) -> None:
    name, model, ckpt, cfg, ref = trained
    out = tmp_path / "out"
    result = zero_ckpt.consolidate(str(ckpt), str(out), hf_config_from=str(cfg), max_shard_size=20_000)
    assert "config.json" in result.files and result.files[-1] == "model.safetensors.index.json"
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    loaded, info, records = _load(out)
    _no_key_problems(info, records)
    ids = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_hf_config_from_without_config_json_is_a_clear_error(trained, tmp_path: Path) -> None:
    name, model, ckpt, cfg, ref = trained
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        cli, ["consolidate", str(ckpt), str(tmp_path / "out"), "--hf-config-from", str(tmp_path / "empty")],
        env={"ZERO_CKPT_DEBUG": ""},
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{tmp_path / 'empty'}/config.json is missing" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


# ----- the tied-name rule (pure) ----------------------------------------------------------------------


def _tied_manifest(trained) -> Manifest:
    name, model, ckpt, cfg, ref = trained
    return Manifest.from_json((ckpt / "manifest.json").read_text())


def test_tied_names_rule(trained) -> None:
    name, model, ckpt, cfg, ref = trained
    if name != "gpt2":
        pytest.skip("tied embeddings: GPT-2")
    from dataclasses import replace

    m = _tied_manifest(trained)
    config = json.loads((cfg / "config.json").read_text())
    assert tied_names_for(m, None) == {"transformer.wte.weight": ("transformer.wte.weight",)}
    assert tied_names_for(m, config) == {"transformer.wte.weight": ("transformer.wte.weight",)}
    assert tied_names_for(m, config, all_tied_names=True) is None
    assert tied_names_for(m, {**config, "tie_word_embeddings": False}) is None  # HF will not tie: every name
    # recorded the other way round (lm_head first): HF still keeps the input embedding's name
    swapped = replace(m, groups=tuple(
        replace(g, params=tuple(
            replace(p, name="lm_head.weight", aliases=("transformer.wte.weight",))
            if p.name == "transformer.wte.weight" else p for p in g.params
        )) for g in m.groups
    ))
    assert tied_names_for(swapped, config) == {"lm_head.weight": ("transformer.wte.weight",)}
    assert tied_names_for(swapped, config, tied_keys=[r"transformer\.wte\.weight"]) == {
        "lm_head.weight": ("lm_head.weight",)
    }


def test_split_consolidate_copies_the_hf_files_at_its_commit(trained, tmp_path: Path) -> None:
    name, model, ckpt, cfg, ref = trained
    out = tmp_path / "out"
    first = zero_ckpt.consolidate_part(str(ckpt), str(out), hf_config_from=str(cfg), max_shard_size=20_000, part=(0, 2))
    assert not first.committed and not (out / "config.json").exists()
    last = zero_ckpt.consolidate_part(str(ckpt), str(out), hf_config_from=str(cfg), max_shard_size=20_000, part=(1, 2))
    assert last.committed and "config.json" in last.outputs
    loaded, info, records = _load(out)
    _no_key_problems(info, records)
    ids = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
