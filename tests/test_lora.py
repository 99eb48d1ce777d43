"""loft_probe.lora: add_lora / LoraLinear, and lora_pairs on own, PEFT and torchtune-style layers."""

import copy
import dataclasses
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from loft_probe.lora import LoraLinear, LoraPair, add_lora, dropout_warning, lora_pairs, unsupported_lora_layers

# Every Hugging Face model below is built from a config; nothing may be downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 16)
        self.v_proj = nn.Linear(16, 8)
        self.xq_proj = nn.Linear(8, 8)  # "q_proj" must not match it: matching is by whole path components
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.v_proj(torch.relu(self.q_proj(x))) + self.xq_proj(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


QV = ["blocks.0.q_proj", "blocks.0.v_proj", "blocks.1.q_proj", "blocks.1.v_proj"]


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


def randomize_B(pairs):
    """PEFT-style init has B = 0, which would hide every bug on the A side."""
    with torch.no_grad():
        for pair in pairs:
            pair.B.normal_()


def dense(pair, x, bias):
    """x @ (W0 + s·B·A)ᵀ + bias, computed from the pair alone."""
    return x @ (pair.base_weight() + pair.delta_weight()).T + bias


# ---- add_lora / LoraLinear -------------------------------------------------------------------------------


def test_add_lora_wraps_exactly_the_targets(net):
    originals = {name: net.get_submodule(name) for name in QV}
    assert add_lora(net, 4, targets=("q_proj", "v_proj")) is net
    for name in QV:
        layer = net.get_submodule(name)
        assert isinstance(layer, LoraLinear)
        assert layer.base_layer is originals[name]
    for name in ["blocks.0.xq_proj", "blocks.1.xq_proj", "head"]:
        assert type(net.get_submodule(name)) is nn.Linear
    assert isinstance(net.blocks[0].norm, nn.LayerNorm)


def test_only_factors_trainable(net):
    add_lora(net, 2, targets=["q_proj", "v_proj"])
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{f}.weight" for n in QV for f in "AB"}


def test_output_unchanged_at_init(net):
    x = torch.randn(5, 8)
    before = net(x)
    add_lora(net, 4, alpha=16, targets=("q_proj", "v_proj"))
    assert torch.equal(net(x), before)


def test_forward_equals_dense_once_B_nonzero():
    torch.manual_seed(1)
    base = nn.Linear(7, 5, dtype=torch.float64)
    layer = LoraLinear(base, rank=3, alpha=2.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    W = base.weight + (2.0 / 3) * layer.lora_B.weight @ layer.lora_A.weight
    x = torch.randn(4, 2, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ W.T + base.bias)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    r=st.integers(1, 9),
    alpha=st.floats(0.01, 100),
    seed=st.integers(0, 2**16),
)
def test_forward_equals_pair_dense_map(n, m, r, alpha, seed):
    r = min(r, m, n)
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(n, m, dtype=torch.float64), r, alpha)
    (pair,) = lora_pairs(nn.Sequential(layer))
    randomize_B([pair])
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(pair, x, layer.base_layer.bias))
    assert pair.scale == pytest.approx(alpha / r)


def test_init_matches_peft_default():
    torch.manual_seed(2)
    n = 400
    layer = LoraLinear(nn.Linear(n, 300), rank=64)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    A = layer.lora_A.weight
    bound = 1 / math.sqrt(n)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3), bound = sqrt(3)·gain/sqrt(fan_in)
    assert A.shape == (64, n)
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.99 * bound
    assert A.mean().abs() < 0.01 * bound
    assert A.var().item() == pytest.approx(bound**2 / 3, rel=0.03)  # variance of U(-b, b)


def test_factors_follow_base_dtype_and_device():
    layer = LoraLinear(nn.Linear(6, 4, dtype=torch.float64), 2)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float64
    meta = LoraLinear(nn.Linear(6, 4, device="meta"), 2)
    assert meta.lora_A.weight.device.type == meta.lora_B.weight.device.type == "meta"


def test_base_layer_frozen_and_repr():
    layer = LoraLinear(nn.Linear(6, 4), 2, alpha=8)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert layer.scaling == 4.0 and layer.rank == 2 and layer.alpha == 8.0
    assert "in_features=6, out_features=4, rank=2, alpha=8.0" in repr(layer)


def test_alpha_defaults_to_rank():
    assert LoraLinear(nn.Linear(6, 4), 3).scaling == 1.0


def test_dropout_applies_to_lora_input_only():
    torch.manual_seed(3)
    assert isinstance(LoraLinear(nn.Linear(6, 4), 2).dropout, nn.Identity)
    layer = LoraLinear(nn.Linear(6, 4), 2, dropout=1.0)  # p = 1 zeroes the whole LoRA input
    assert isinstance(layer.dropout, nn.Dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 6)
    assert torch.equal(layer.train()(x), layer.base_layer(x))
    assert not torch.allclose(layer.eval()(x), layer.base_layer(x))


def test_pairs_carry_their_dropout_and_the_warning_names_them(net):
    add_lora(net, 2, targets=["q_proj"], dropout=0.1)
    add_lora(net, 2, targets=["v_proj"])
    pairs = lora_pairs(net)
    assert [pair.dropout for pair in pairs] == [0.1, 0.0, 0.1, 0.0]
    assert dropout_warning(pairs).startswith("2 of 4 LoRA layer(s) have dropout p=0.1: ")
    assert "\n" not in dropout_warning(pairs)
    assert dropout_warning(pairs[1::2]) is None and dropout_warning([]) is None
    pairs[2].module.dropout.p = 0.3
    assert "p=0.1–0.3" in dropout_warning(lora_pairs(net))


def test_all_linear_with_exclude(net):
    add_lora(net, 2, targets="all-linear", exclude=("head",))
    wrapped = [name for name, m in net.named_modules() if isinstance(m, LoraLinear)]
    assert wrapped == [f"blocks.{i}.{p}" for i in (0, 1) for p in ("q_proj", "v_proj", "xq_proj")]
    assert type(net.head) is nn.Linear


def test_second_call_on_other_layers_keeps_first_factors_trainable(net):
    add_lora(net, 2, targets=["q_proj"])
    add_lora(net, 3, targets=["v_proj"])
    assert net.blocks[0].q_proj.rank == 2 and net.blocks[0].v_proj.rank == 3
    assert net.blocks[0].q_proj.lora_A.weight.requires_grad
    # all-linear after that wraps the rest, never the factors or base layers inside LoRA layers
    add_lora(net, 1, targets="all-linear")
    assert isinstance(net.blocks[0].q_proj.lora_A, nn.Linear)
    assert isinstance(net.head, LoraLinear)


@pytest.mark.parametrize("rank", [0, -1, 2.0, True, "4"])
def test_bad_rank(net, rank):
    with pytest.raises(ValueError, match="rank") as info:
        add_lora(net, rank, targets=["q_proj"])
    assert repr(rank) in str(info.value)


@pytest.mark.parametrize("alpha", [0, -1.5, float("nan"), float("inf")])
def test_bad_alpha(net, alpha):
    with pytest.raises(ValueError, match="alpha") as info:
        add_lora(net, 2, alpha, targets=["q_proj"])
    assert repr(alpha) in str(info.value)


@pytest.mark.parametrize("dropout", [-0.1, 1.5, float("nan")])
def test_bad_dropout_leaves_model_untouched(net, dropout):
    with pytest.raises(ValueError, match="dropout") as info:
        add_lora(net, 2, targets=["q_proj"], dropout=dropout)
    assert repr(dropout) in str(info.value)
    assert not any(isinstance(m, LoraLinear) for m in net.modules())


@pytest.mark.parametrize("target", ["k_proj", "q", "proj"])
def test_target_matching_nothing(net, target):
    with pytest.raises(ValueError, match="matches no module") as info:
        add_lora(net, 2, targets=["q_proj", target])
    assert repr(target) in str(info.value)
    assert "blocks.0.q_proj" in str(info.value)  # lists what is available


def test_target_matching_non_linear(net):
    with pytest.raises(ValueError, match="'blocks.0.norm', a LayerNorm, not an nn.Linear") as info:
        add_lora(net, 2, targets=["norm"])
    assert "'norm'" in str(info.value)


def test_plain_string_targets_rejected(net):
    with pytest.raises(ValueError, match="'q_proj'"):
        add_lora(net, 2, targets="q_proj")


def test_exclude_matching_nothing(net):
    with pytest.raises(ValueError, match="exclude 'lm_head' matches no module"):
        add_lora(net, 2, targets="all-linear", exclude=["lm_head"])


def test_exclude_everything(net):
    with pytest.raises(ValueError, match="leave no nn.Linear"):
        add_lora(net, 2, targets=["head"], exclude=["head"])


def test_rank_too_large_names_layer_and_shape_and_leaves_model_untouched(net):
    message = r"rank 4 exceeds min\(out, in\) of 'head' with weight shape \(3, 8\)"
    with pytest.raises(ValueError, match=message):
        add_lora(net, 4, targets=["q_proj", "head"])
    assert not any(isinstance(m, LoraLinear) for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())


def test_rank_too_large_for_lora_linear():
    with pytest.raises(ValueError, match=r"rank 5 exceeds .*\(4, 6\)"):
        LoraLinear(nn.Linear(6, 4), 5)


def test_add_lora_twice_on_same_layer(net):
    add_lora(net, 2, targets=["q_proj"])
    with pytest.raises(ValueError, match="'q_proj' matches 'blocks.0.q_proj', which already has LoRA"):
        add_lora(net, 2, targets=["q_proj"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_lora(net, 1, targets="all-linear", exclude=["xq_proj", "v_proj", "head"])


# ---- lora_pairs on the project's own layers ----------------------------------------------------------------


def test_lora_pairs_own_layers(net):
    linears = {name: net.get_submodule(name) for name in QV}
    add_lora(net, 2, alpha=6, targets=["v_proj", "q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pairs = lora_pairs(net)
    assert [p.name for p in pairs] == QV  # named_modules() order, paths of the original nn.Linear
    randomize_B(pairs)
    for pair in pairs:
        layer = net.get_submodule(pair.name)
        assert pair.module is layer and pair.adapter == "default" and not pair.fan_in_fan_out
        assert pair.A is layer.lora_A.weight and pair.B is layer.lora_B.weight
        assert pair.base is linears[pair.name].weight
        assert pair.scale == 3.0 and pair.rank == 2
        assert pair.shape == tuple(linears[pair.name].weight.shape)
        assert not pair.delta_weight().requires_grad
        x = torch.randn(4, pair.shape[1])
        torch.testing.assert_close(layer(x), dense(pair, x, linears[pair.name].bias))
    with pytest.raises(dataclasses.FrozenInstanceError):
        pairs[0].scale = 1.0
    assert unsupported_lora_layers(net) == []


def test_importing_lora_does_not_need_peft():
    code = (
        "import sys; sys.modules['peft'] = None\n"  # makes any `import peft` fail
        "from torch import nn\n"
        "from loft_probe.lora import add_lora, lora_pairs\n"
        "m = add_lora(nn.Sequential(nn.Linear(4, 4)), 2, targets=['0'])\n"
        "assert [p.name for p in lora_pairs(m)] == ['0']\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---- torchtune-style layers -----------------------------------------------------------------------------


class TuneLoRALinear(nn.Module):
    """The shape of torchtune's LoRALinear: frozen weight (out, in) on the module, lora_a/lora_b children."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(out_dim), requires_grad=False)
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.scaling = alpha / rank

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias) + self.lora_b(self.lora_a(x)) * self.scaling


class TuneDoRALinear(TuneLoRALinear):
    def __init__(self, *args):
        super().__init__(*args)
        self.magnitude = nn.Parameter(self.weight.norm(dim=1))


def test_torchtune_style_layer():
    torch.manual_seed(4)
    model = nn.Module()
    model.attn = nn.Module()
    model.attn.q = TuneLoRALinear(6, 5, rank=2, alpha=16)
    (pair,) = lora_pairs(model)
    assert pair.name == "attn.q" and pair.scale == 8.0 and pair.rank == 2 and pair.shape == (5, 6)
    assert pair.A is model.attn.q.lora_a.weight and pair.base is model.attn.q.weight
    randomize_B([pair])
    x = torch.randn(3, 6)
    torch.testing.assert_close(model.attn.q(x), dense(pair, x, model.attn.q.bias))


def test_torchtune_style_dropout():
    model = nn.Sequential(TuneLoRALinear(6, 5, 2, 2), TuneLoRALinear(5, 5, 2, 2))
    model[0].dropout, model[1].dropout = nn.Dropout(0.2), nn.Identity()  # torchtune's attribute and values
    assert [pair.dropout for pair in lora_pairs(model)] == [0.2, 0.0]


def test_torchtune_style_dora_skipped():
    model = nn.Sequential(TuneLoRALinear(6, 5, 2, 2), TuneDoRALinear(5, 5, 2, 2))
    with pytest.warns(UserWarning, match="plain AdamW: 1$") as record:
        pairs = lora_pairs(model)
    assert len(record) == 1
    assert [p.name for p in pairs] == ["0"]


def test_packed_base_weight_skipped():
    """A quantised base stores a packed weight whose shape is not (m, n); it cannot be read as W0."""
    layer = TuneLoRALinear(6, 4, 2, 2)
    layer.weight = nn.Parameter(torch.zeros(12, 1), requires_grad=False)  # 4-bit packing of a (4, 6) matrix
    assert unsupported_lora_layers(nn.Sequential(layer)) == ["0"]


def test_add_lora_refuses_foreign_lora_layer():
    model = nn.Sequential(TuneLoRALinear(6, 5, 2, 2))
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, 2, targets=["0"])


# ---- PEFT ------------------------------------------------------------------------------------------------


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


@pytest.fixture
def bert_config():
    transformers = pytest.importorskip("transformers")
    return transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=50
    )


def tiny_bert(config):
    from transformers import BertModel

    torch.manual_seed(5)
    return BertModel(config).eval()


def names_ending(model, *suffixes):
    return [name for name, _ in model.named_modules() if name.endswith(tuple("." + s for s in suffixes))]


def check_against_peft(peft_model, pairs):
    """Each pair's W0 + s·B·A equals PEFT's own merge of that adapter, at the un-adapted module path."""
    for pair in pairs:
        merged = copy.deepcopy(peft_model).merge_and_unload(adapter_names=[pair.adapter])
        layer = merged.get_submodule(pair.name.split("@")[0])
        weight = layer.weight.T if pair.fan_in_fan_out else layer.weight
        torch.testing.assert_close(pair.base_weight() + pair.delta_weight(), weight)
        own_delta = pair.module.get_delta_weight(pair.adapter)
        torch.testing.assert_close(pair.delta_weight(), own_delta.T if pair.fan_in_fan_out else own_delta)


def check_forward(pairs):
    """The active adapter's layer computes x ↦ x (W0 + s·B·A)ᵀ + b."""
    for pair in pairs:
        x = torch.randn(3, pair.shape[1])
        with torch.no_grad():
            torch.testing.assert_close(pair.module(x), dense(pair, x, pair.module.base_layer.bias))


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_bert(peft, bert_config, rslora):
    expected_names = names_ending(tiny_bert(bert_config), "query", "value")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_rslora=rslora)
    model = peft.get_peft_model(tiny_bert(bert_config), config)
    pairs = lora_pairs(model)
    assert [p.name for p in pairs] == expected_names
    assert len(pairs) == 4
    for pair in pairs:
        assert pair.scale == (8 / math.sqrt(4) if rslora else 8 / 4)
        assert pair.adapter == "default" and pair.rank == 4 and pair.shape == (32, 32)
        assert pair.A is pair.module.lora_A["default"].weight
        assert pair.B is pair.module.lora_B["default"].weight
        assert pair.base is pair.module.base_layer.weight
    randomize_B(pairs)
    check_forward(pairs)
    check_against_peft(model, pairs)
    # The LoraModel inside the PeftModel has its own prefix ("model."); names must not change.
    assert [p.name for p in lora_pairs(model.base_model)] == expected_names


def test_peft_dropout_per_adapter(peft, bert_config):
    model = peft.get_peft_model(
        tiny_bert(bert_config), peft.LoraConfig(r=4, target_modules=["query"], lora_dropout=0.1)
    )
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["query"]))  # PEFT's default: no dropout
    assert {(pair.adapter, pair.dropout) for pair in lora_pairs(model)} == {("default", 0.1), ("other", 0.0)}


def test_peft_two_adapters(peft, bert_config):
    model = peft.get_peft_model(
        tiny_bert(bert_config), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"])
    )
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["query", "value"]))
    pairs = lora_pairs(model)
    assert [p.name for p in pairs] == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.query@other",
        "encoder.layer.0.attention.self.value@other",
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.query@other",
        "encoder.layer.1.attention.self.value@other",
    ]
    assert {(p.adapter, p.rank, p.scale) for p in pairs} == {("default", 4, 2.0), ("other", 2, 3.0)}
    randomize_B(pairs)
    check_against_peft(model, pairs)
    model.set_adapter("other")
    check_forward([p for p in pairs if p.adapter == "other"])


def test_peft_gpt2_conv1d_fan_in_fan_out(peft):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(6)
    expected_names = names_ending(transformers.GPT2Model(config), "c_attn")
    model = peft.get_peft_model(
        transformers.GPT2Model(config).eval(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    )
    (pair,) = lora_pairs(model)
    assert [pair.name] == expected_names == ["h.0.attn.c_attn"]
    assert pair.fan_in_fan_out
    assert pair.base.shape == (32, 96) and pair.base_weight().shape == (96, 32) and pair.shape == (96, 32)
    assert pair.A.shape == (4, 32) and pair.B.shape == (96, 4)
    randomize_B([pair])
    check_forward([pair])
    check_against_peft(model, [pair])


def test_peft_dora_skipped_with_one_warning(peft, bert_config):
    model = peft.get_peft_model(
        tiny_bert(bert_config), peft.LoraConfig(r=4, target_modules=["query", "value"], use_dora=True)
    )
    skipped = names_ending(tiny_bert(bert_config), "query", "value")
    with pytest.warns(UserWarning, match="plain AdamW") as record:
        pairs = lora_pairs(model)
    assert pairs == []
    assert len(record) == 1
    assert all(name in str(record[0].message) for name in skipped)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert unsupported_lora_layers(model) == skipped


@pytest.mark.parametrize("marker", ["lora_variant", "lora_magnitude_vector"])
def test_peft_dora_found_by_either_marker(peft, bert_config, marker):
    """peft < 0.15 marks DoRA only by its magnitude vector; other variants only by lora_variant."""
    model = peft.get_peft_model(
        tiny_bert(bert_config), peft.LoraConfig(r=4, target_modules=["query"], use_dora=True)
    )
    for name in names_ending(model, "query"):
        del getattr(model.get_submodule(name), marker)["default"]
    assert unsupported_lora_layers(model) == names_ending(tiny_bert(bert_config), "query")


def test_peft_dora_second_adapter_skipped(peft, bert_config):
    model = peft.get_peft_model(tiny_bert(bert_config), peft.LoraConfig(r=4, target_modules=["query"]))
    model.add_adapter("dora", peft.LoraConfig(r=4, target_modules=["query"], use_dora=True))
    with pytest.warns(UserWarning, match="plain AdamW") as record:
        pairs = lora_pairs(model)
    assert len(record) == 1
    assert {p.adapter for p in pairs} == {"default"} and len(pairs) == 2
    assert unsupported_lora_layers(model) == [f"encoder.layer.{i}.attention.self.query@dora" for i in (0, 1)]


def test_peft_embedding_skipped(peft, bert_config):
    model = peft.get_peft_model(
        tiny_bert(bert_config), peft.LoraConfig(r=4, target_modules=["query", "word_embeddings"])
    )
    with pytest.warns(UserWarning, match="plain AdamW: embeddings.word_embeddings$") as record:
        pairs = lora_pairs(model)
    assert len(record) == 1
    assert [p.name for p in pairs] == names_ending(tiny_bert(bert_config), "query")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.lin = nn.Linear(4, 2)


@pytest.mark.parametrize("lora_bias", [False, True])
def test_peft_conv_and_lora_bias_skipped(peft, lora_bias):
    model = peft.get_peft_model(
        ConvNet(), peft.LoraConfig(r=2, target_modules=["conv", "lin"], lora_bias=lora_bias)
    )
    with pytest.warns(UserWarning, match="plain AdamW") as record:
        pairs = lora_pairs(model)
    assert len(record) == 1
    # with lora_bias, lora_B carries a bias: W = W0 + s·B·A no longer describes the layer
    assert [p.name for p in pairs] == ([] if lora_bias else ["lin"])
    assert unsupported_lora_layers(model) == (["conv", "lin"] if lora_bias else ["conv"])


def test_pair_is_hashable_by_identity(net):
    add_lora(net, 2, targets=["q_proj"])
    first, second = lora_pairs(net), lora_pairs(net)
    assert isinstance(first[0], LoraPair)
    assert first[0] != second[0] and len({*first, *second}) == 4


def test_compiled_model_layers_keep_their_eager_names(tmp_path):
    """torch.compile wraps the model (``_orig_mod.``): pairs and probed layers keep the eager names, so runs of a
    compiled and an eager model compare (no forward pass: compiling itself is not what is tested)."""
    from loft_probe import attach

    torch.manual_seed(0)
    model = add_lora(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), rank=2, targets=["0", "2"])
    compiled = torch.compile(model)
    assert [p.name for p in lora_pairs(compiled)] == [p.name for p in lora_pairs(model)] == ["0", "2"]
    dense = torch.compile(nn.Sequential(nn.Linear(4, 4)))
    with attach(dense, torch.optim.AdamW(dense.parameters()), tmp_path / "run") as probe:
        assert [layer.name for layer in probe.layers] == ["0"]
