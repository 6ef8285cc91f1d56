"""Module resolution, layouts, shape groups, default module lists and fingerprints."""

import re

import pytest
import torch
from transformers import Gemma2Config
from transformers import Gemma2ForCausalLM
from transformers import GPT2Config
from transformers import GPTJConfig
from transformers import GPTJForCausalLM
from transformers import LlamaConfig
from transformers import LlamaForCausalLM
from transformers import MistralConfig
from transformers import MistralForCausalLM
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM
from transformers.pytorch_utils import Conv1D

from emsedit_fast.models.adapter import EditedModule
from emsedit_fast.models.adapter import default_module_patterns
from emsedit_fast.models.adapter import fingerprint
from emsedit_fast.models.adapter import fingerprint_details
from emsedit_fast.models.adapter import group_by_shape
from emsedit_fast.models.adapter import module_layout
from emsedit_fast.models.adapter import resolve_modules
from emsedit_fast.models.adapter import set_attention
from emsedit_fast.models.tiny import tiny_gpt2
from emsedit_fast.models.tiny import tiny_llama


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _layers(pattern: str) -> list[int]:
    """The layer numbers of a default pattern like 'model\\.layers\\.(10|11)\\.mlp\\.gate_proj'."""
    return [int(x) for x in re.search(r"\(([\d|]+)\)", pattern).group(1).split("|")]


def _suffix(pattern: str) -> str:
    return pattern.split(")")[-1].replace("\\", "")


def test_resolve_gpt2_conv1d_layout(gpt2):
    mods = resolve_modules(gpt2, [r"transformer\.h\.1\.mlp\.c_proj", r"transformer\.h\.\d+\.mlp\.c_fc"])
    assert [m.name for m in mods] == ["transformer.h.1.mlp.c_proj", "transformer.h.0.mlp.c_fc",
                                      "transformer.h.1.mlp.c_fc"]  # pattern order, then model order
    proj, fc = mods[0], mods[1]
    assert isinstance(proj.module, Conv1D) and proj.transposed
    assert proj.shape == (256, 64) and proj.weight.shape == (256, 64)  # Conv1D stores (d_in, d_out)
    assert fc.shape == (64, 256) and fc.weight.shape == (64, 256)
    assert proj.weight is gpt2.transformer.h[1].mlp.c_proj.weight
    assert module_layout(proj.module) == (256, 64, True)


def test_resolve_llama_linear_layout(llama):
    mods = resolve_modules(llama, [r"model\.layers\.\d+\.mlp\.(gate|down)_proj"])
    assert [m.name for m in mods] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj",
                                      "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"]
    gate, down = mods[0], mods[1]
    assert not gate.transposed and gate.shape == (64, 128) and gate.weight.shape == (128, 64)  # Linear: (d_out, d_in)
    assert down.shape == (128, 64) and down.weight.shape == (64, 128)
    assert gate.group_key == (64, 128, False)


def test_edited_module_is_frozen(llama):
    m = resolve_modules(llama, [r"model\.layers\.0\.mlp\.up_proj"])[0]
    with pytest.raises(AttributeError):
        m.d_in = 3
    again = resolve_modules(llama, [r"model\.layers\.0\.mlp\.up_proj"])[0]
    assert m == again and hash(m) == hash(again)
    assert isinstance(m, EditedModule)


def test_resolve_errors_name_the_pattern(gpt2, llama):
    with pytest.raises(ValueError, match=r"'transformer\\\\\.h\\\\\.9.*matched no module"):
        resolve_modules(gpt2, [r"transformer\.h\.9\.mlp\.c_proj"])
    with pytest.raises(ValueError, match=r"matched 'transformer\.h\.0\.mlp' of type GPT2MLP"):
        resolve_modules(gpt2, [r"transformer\.h\.0\.mlp"])
    with pytest.raises(ValueError, match="of type Embedding"):
        resolve_modules(llama, [r"model\.embed_tokens"])
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj' matched by pattern .* already matched"):
        resolve_modules(llama, [r"model\.layers\.0\.mlp\.up_proj", r"model\.layers\.\d\.mlp\.up_proj"])
    with pytest.raises(ValueError, match="not a valid regex"):
        resolve_modules(llama, ["model.layers.(0"])
    with pytest.raises(ValueError, match="no module patterns"):
        resolve_modules(llama, [])
    with pytest.raises(TypeError, match="list of regexes"):
        resolve_modules(llama, r"model\.layers\.0\.mlp\.up_proj")


def test_resolve_uses_fullmatch(llama):
    # 'mlp.up_proj' is a suffix of real names, but fullmatch must not accept a partial name.
    with pytest.raises(ValueError, match="matched no module"):
        resolve_modules(llama, [r"mlp\.up_proj"])


def test_group_by_shape(llama):
    mods = resolve_modules(llama, [r"model\.layers\.0\.mlp\.gate_proj", r"model\.layers\.\d\.mlp\.down_proj",
                                   r"model\.layers\.1\.mlp\.up_proj"])
    groups = group_by_shape(mods)
    assert [g.key for g in groups] == [(64, 128, False), (128, 64, False)]
    assert groups[0].names == ("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj")
    assert groups[1].names == ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    assert groups[0].index("model.layers.1.mlp.up_proj") == 1
    assert groups[1].index("model.layers.0.mlp.down_proj") == 0
    assert groups[0].width == 192 and len(groups[1]) == 2 and groups[1].d_in == 128 and not groups[1].transposed
    with pytest.raises(KeyError, match="not in shape group"):
        groups[0].index("model.layers.0.mlp.down_proj")


def test_group_key_separates_layouts():
    # Same (d_in, d_out) but different storage layouts must not share a group.
    lin = torch.nn.Linear(8, 4)
    conv = Conv1D(4, 8)  # nf = d_out 4, nx = d_in 8
    model = torch.nn.ModuleDict({"a": lin, "b": conv})
    groups = group_by_shape(resolve_modules(model, ["a", "b"]))
    assert [g.key for g in groups] == [(8, 4, False), (8, 4, True)]


def test_tiny_defaults_resolve(gpt2, llama):
    for regime in ("sequential", "batch"):
        g_mods = resolve_modules(gpt2, default_module_patterns(gpt2, regime))
        assert [m.name for m in g_mods] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
        assert all(m.transposed for m in g_mods)
        l_mods = resolve_modules(llama, default_module_patterns(llama, regime))
        assert [m.name for m in l_mods] == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
        assert len(group_by_shape(l_mods)) == 1  # gate and up share (64 -> 128): one group, m = 2
    one_layer = tiny_llama(layers=1)
    assert len(resolve_modules(one_layer, default_module_patterns(one_layer))) == 2


def test_published_module_lists():
    llama3 = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336)
    for regime in ("sequential", "batch"):
        p = default_module_patterns(llama3, regime)
        assert [_layers(x) for x in p] == [list(range(11, 16)), list(range(18, 25))]
        assert [_suffix(x) for x in p] == [".mlp.gate_proj", ".mlp.up_proj"]
    smol = LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536)
    p = default_module_patterns(smol)
    assert [_layers(x) for x in p] == [list(range(10, 15)), list(range(17, 23))]
    gptj = GPTJConfig(n_layer=28, n_embd=4096)
    assert _layers(default_module_patterns(gptj, "sequential")[0]) == list(range(10, 27, 2))
    assert _suffix(default_module_patterns(gptj, "sequential")[0]) == ".mlp.fc_in"
    assert _layers(default_module_patterns(gptj, "batch")[0]) == list(range(22, 28))
    assert _suffix(default_module_patterns(gptj, "batch")[0]) == ".mlp.fc_out"
    gemma = Gemma2Config(num_hidden_layers=42, hidden_size=3584, intermediate_size=14336)
    seq = default_module_patterns(gemma, "sequential")
    assert [_suffix(x) for x in seq] == [".mlp.gate_proj", ".mlp.up_proj"]
    assert all(_layers(x) == list(range(32, 41)) for x in seq)
    assert [_suffix(x) for x in default_module_patterns(gemma, "batch")] == [".mlp.down_proj"]
    xl = GPT2Config(n_layer=48, n_embd=1600)
    assert _layers(default_module_patterns(xl)[0]) == list(range(6, 12))
    assert _layers(default_module_patterns(GPT2Config())[0]) == list(range(6, 12))  # 12 layers: the latter half
    for cfg in (MistralConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336),
                Qwen2Config(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944)):
        p = default_module_patterns(cfg)
        assert [_layers(x) for x in p] == [[17, 18, 19]] and _suffix(p[0]) == ".mlp.down_proj"


@pytest.mark.parametrize("n_layers", [5, 8, 16, 24, 48, 80])
def test_scaled_llama_defaults(n_layers):
    p = default_module_patterns(LlamaConfig(num_hidden_layers=n_layers, hidden_size=64, intermediate_size=128))
    gate, up = _layers(p[0]), _layers(p[1])
    assert 1 <= len(gate) <= 5 and 1 <= len(up) <= 7  # never more modules than the published list
    assert 0 <= gate[0] and up[-1] < n_layers
    assert gate == list(range(gate[0], gate[-1] + 1)) and up == list(range(up[0], up[-1] + 1))
    assert max(gate) <= min(up)  # gate_proj earlier, up_proj later, as in LLaMA-3
    mid_gate = (gate[0] + gate[-1] + 1) / 2 / n_layers
    assert 0.25 < mid_gate < 0.55


def _small(cls, cfg_cls, **kw):
    torch.manual_seed(0)
    return cls(cfg_cls(vocab_size=64, **kw))


@pytest.mark.parametrize("build", [
    lambda: _small(GPTJForCausalLM, GPTJConfig, n_layer=6, n_embd=32, n_head=4, rotary_dim=4),
    lambda: _small(Gemma2ForCausalLM, Gemma2Config, num_hidden_layers=6, hidden_size=32, intermediate_size=64,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    lambda: _small(Qwen2ForCausalLM, Qwen2Config, num_hidden_layers=6, hidden_size=32, intermediate_size=64,
                   num_attention_heads=4, num_key_value_heads=2),
    lambda: _small(MistralForCausalLM, MistralConfig, num_hidden_layers=6, hidden_size=32, intermediate_size=64,
                   num_attention_heads=4, num_key_value_heads=2),
    lambda: _small(LlamaForCausalLM, LlamaConfig, num_hidden_layers=6, hidden_size=32, intermediate_size=64,
                   num_attention_heads=4, num_key_value_heads=2),
], ids=["gptj", "gemma2", "qwen2", "mistral", "llama"])
def test_scaled_defaults_resolve_on_real_module_names(build):
    model = build()
    for regime in ("sequential", "batch"):
        mods = resolve_modules(model, default_module_patterns(model, regime))
        assert mods and all(not m.transposed for m in mods)


def test_default_errors():
    with pytest.raises(ValueError, match="regime"):
        default_module_patterns(LlamaConfig(), "online")
    with pytest.raises(ValueError, match="no default edited modules for model_type 'bert'"):
        from transformers import BertConfig

        default_module_patterns(BertConfig())


def test_fingerprint(gpt2):
    mods = resolve_modules(gpt2, default_module_patterns(gpt2))
    fp = fingerprint(gpt2, mods)
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    other = tiny_gpt2()  # same seed: same weights, another instance
    assert fingerprint(other, resolve_modules(other, default_module_patterns(other))) == fp
    assert fingerprint(gpt2, mods[:1]) != fp
    assert fingerprint(tiny_gpt2(seed=1), resolve_modules(tiny_gpt2(seed=1), default_module_patterns(gpt2))) != fp
    w = mods[1].weight
    with torch.no_grad():
        old = w[3, 5].item()
        w[3, 5] += 1e-3
        assert fingerprint(gpt2, mods) != fp
        w[3, 5] = old
    assert fingerprint(gpt2, mods) == fp
    details = fingerprint_details(gpt2, mods)
    assert details["config"]["model_type"] == "gpt2" and details["config"]["n_layer"] == 2
    assert details["modules"][0]["name"] == "transformer.h.0.mlp.c_proj" and details["modules"][0]["transposed"]


def test_fingerprint_bf16(llama):
    model = tiny_llama().to(torch.bfloat16)
    mods = resolve_modules(model, default_module_patterns(model))
    fp = fingerprint(model, mods)
    assert fp != fingerprint(llama, resolve_modules(llama, default_module_patterns(llama)))
    assert fingerprint_details(model, mods)["modules"][0]["dtype"] == "bfloat16"


def _sdpa_llama(dtype=torch.float32):
    model = tiny_llama().to(dtype)
    model.set_attn_implementation("sdpa")  # the tiny models are built eager; a downloaded LLaMA comes with SDPA
    return model


def test_attention_auto_is_eager_for_low_precision_on_cpu():
    assert set_attention(_sdpa_llama(), "auto") == "sdpa"  # fp32: the model keeps its own
    for dtype in (torch.bfloat16, torch.float16):
        model = _sdpa_llama(dtype)
        assert set_attention(model, "auto") == "eager"
        assert model.config._attn_implementation == "eager"
    gpt2 = tiny_gpt2().to(torch.bfloat16)
    gpt2.set_attn_implementation("sdpa")
    assert set_attention(gpt2, "auto") == "eager"


def test_attention_can_be_forced_and_bad_values_are_refused():
    model = _sdpa_llama(torch.bfloat16)
    assert set_attention(model, "sdpa") == "sdpa"
    assert set_attention(model, "eager") == "eager"
    assert set_attention(model, "sdpa") == "sdpa"
    with pytest.raises(ValueError, match="model.attention: 'flash' is not one of"):
        set_attention(model, "flash")
    with pytest.raises(ValueError, match="model.attention: Linear has no transformers config"):
        set_attention(torch.nn.Linear(2, 2), "eager")
    assert set_attention(torch.nn.Linear(2, 2), "auto") is None  # not a transformers model: left alone


def test_attention_without_set_attn_implementation_sets_the_config(monkeypatch):
    """transformers releases before set_attn_implementation: the choice goes to the config, which the attention
    layers read at every call, and the model's output follows it."""
    model = _sdpa_llama(torch.bfloat16)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.set_attn_implementation("eager")
    eager_logits = model(input_ids=ids).logits
    model.set_attn_implementation("sdpa")
    assert not torch.equal(model(input_ids=ids).logits, eager_logits)  # bf16: the two round differently
    monkeypatch.setattr(model, "set_attn_implementation", None, raising=False)  # as if the release had none
    assert set_attention(model, "auto") == "eager"
    assert torch.equal(model(input_ids=ids).logits, eager_logits)


def test_session_applies_model_attention_and_the_edit_does_not_depend_on_it():
    """open_session sets the attention of the model it is given (auto: eager in bf16 on the CPU), and in fp32 an edit
    through eager attention equals the one through SDPA to rounding."""
    from emsedit_fast import api
    from emsedit_fast.config import load
    from emsedit_fast.data.edit_batch import tokenize_batch
    from emsedit_fast.data.facts import bundled_facts
    from emsedit_fast.models.tiny import tiny_tokenizer

    base = ["editor.rank=16", "editor.eta_init=1e-2"]
    session = api.open_session(load("emsedit", overrides=[*base, "model.dtype=bfloat16"]),
                               model=_sdpa_llama(torch.bfloat16), tokenizer=tiny_tokenizer())
    assert session.model.config._attn_implementation == "eager"
    session = api.open_session(load("emsedit", overrides=[*base, "model.dtype=bfloat16", "model.attention=sdpa"]),
                               model=_sdpa_llama(torch.bfloat16), tokenizer=tiny_tokenizer())
    assert session.model.config._attn_implementation == "sdpa"

    edited = {}
    for attention in ("sdpa", "eager"):
        cfg = load("emsedit", overrides=[*base, f"model.attention={attention}"])
        session = api.open_session(cfg, model=_sdpa_llama(), tokenizer=tiny_tokenizer())
        assert session.model.config._attn_implementation == attention
        batch = tokenize_batch(session.tokenizer, bundled_facts("eval")[:4], 4, need_equiv=False)
        session.editor.edit(batch.edit)
        edited[attention] = [w - b.to(w.dtype) for w, b in zip(session.editor.weights(), session.editor.base)]
    for got, ref in zip(edited["eager"], edited["sdpa"]):
        assert ref.abs().max() > 0  # the edit moved the weights
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
