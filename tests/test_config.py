"""Typed configs: presets, dotted overrides, one-line errors."""

import pytest

from unicodebook.config import load_config, parse_overrides
from unicodebook.errors import ConfigError


def test_tiny_preset_and_dotted_overrides():
    cfg = load_config(
        "tiny", ["model.codebook.mode=frozen", "train_tokenizer.lr=3e-4", "model.autoencoder.ch_mult=[1,2]"]
    )
    assert cfg.model.codebook.mode == "frozen"
    assert cfg.train_tokenizer.lr == pytest.approx(3e-4)
    assert cfg.model.autoencoder.ch_mult == [1, 2]
    assert cfg.model.image_size == 36  # untouched keys keep the preset's value


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.codebok.mode=frozen", "unknown config key 'model.codebok'"),
        ("model.codebook.mode=sometimes", "model.codebook.mode: 'sometimes' is not one of frozen, dual, iterative"),
        ("train_tokenizer.steps=many", "train_tokenizer.steps: expected an integer, got 'many'"),
        ("train_tokenizer.steps=1.5", "train_tokenizer.steps: expected an integer, got 1.5"),
        ("model.autoencoder.ch_mult=3", "model.autoencoder.ch_mult: expected a list, got 3"),
        ("data.preload=maybe", "data.preload: expected true/false, got 'maybe'"),
        ("model=3", "model: expected a mapping, got 3"),
    ],
)
def test_bad_keys_and_types_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_unknown_key_in_a_yaml_file(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model:\n  image_size: 32\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'model.colour'"):
        load_config(p)
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_override_syntax():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_overrides(["justakey"])


def test_codebook_ramp_is_validated_at_load_time():
    with pytest.raises(ConfigError, match=r"^model.codebook: codebook ramp needs 0 <= align_start <= align_end <= 1"):
        load_config("tiny", ["model.codebook.align_end=1.5"])


def test_the_accelerate_example_configs_are_valid_and_the_7b_preset_trains_in_bf16():
    from accelerate.commands.config.config_args import ClusterConfig

    from unicodebook.config import PRESET_DIR

    fsdp = ClusterConfig.from_yaml_file(str(PRESET_DIR / "accelerate" / "fsdp_7b.yaml"))
    assert fsdp.distributed_type.name == "FSDP" and fsdp.num_processes == 8
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert (
        ClusterConfig.from_yaml_file(str(PRESET_DIR / "accelerate" / "ddp_8gpu.yaml")).distributed_type.name
        == "MULTI_GPU"
    )
    cfg = load_config("7b")
    assert cfg.train_lm.precision == "bf16" and cfg.train_lm.gradient_checkpointing
    assert cfg.train_lm.batch_size % 8 == 0  # the global batch splits over 8 GPUs


def test_a_config_extends_its_base_key_by_key(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: tiny\ntrain_lm:\n  steps: 7\n  phases: [{steps: 7, name: only}]\n")
    (tmp_path / "more.yaml").write_text("base: mine.yaml\nllm:\n  num_layers: 2\n")  # relative to this file
    cfg, tiny = load_config(tmp_path / "more.yaml"), load_config("tiny")
    assert (cfg.train_lm.steps, cfg.llm.num_layers) == (7, 2)
    assert [p.name for p in cfg.train_lm.phases] == ["only"]  # lists are replaced, not merged
    assert cfg.train_lm.lr == tiny.train_lm.lr and cfg.model == tiny.model  # everything else is the base's
    assert load_config(tmp_path / "more.yaml", ["train_lm.steps=9", "train_lm.phases=[]"]).train_lm.steps == 9


def test_bad_bases_are_one_line_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: its bases form a cycle through .*a.yaml$"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere\n")
    with pytest.raises(
        ConfigError,
        match=r"^config 'nowhere' not found \(a YAML path or a preset: "
        r"7b, lavit-tiny, photos, photos-256, seed-tiny, tiny, tiny_full\)$",
    ):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [tiny]\n")
    with pytest.raises(ConfigError, match=r"d.yaml: 'base' must be a preset name or a YAML path$"):
        load_config(tmp_path / "d.yaml")


def test_the_full_recipe_is_the_tiny_preset_with_three_declared_phases():
    full, tiny = load_config("tiny_full"), load_config("tiny")
    assert full.model == tiny.model and full.llm == tiny.llm  # the same tokenizer and LLM: only stage II differs
    assert [(p.name, p.steps) for p in full.train_lm.phases] == [("draw", 800), ("mix", 2800), ("read", 1400)]
    lrs = [q.lr for _, q in full.train_lm.phase_list()]
    assert lrs == [2e-3, 2e-3, 1e-3] and full.train_lm.image_layout == "depth"
