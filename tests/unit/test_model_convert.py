"""The model converter (model/fast/convert.py): the plain model of model/ with the fast pieces swapped in from
outside. It keeps every Parameter object and every state-dict key, swaps what it is asked to, leaves alone
what it is told not to (fuse_qkv / autocast_linear off where weights are gathered per module), and the plain
package names no distributed runtime and imports no triton."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from model import DebertaForEntityScoring, DebertaForMaskedLM, DebertaForSequenceClassification, preset
from model.attention import DisentangledSelfAttention
from model.encoder import Intermediate
from model.fast import convert
from model.fast import modules as fast
from model.layers import Linear
from model.rtd import RTDModel, generator_config_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = preset("tiny", vocab_size=300)


def builders():
    return {"mlm": lambda: DebertaForMaskedLM(CONFIG),
            "rtd": lambda: RTDModel(CONFIG.replace(conv_kernel_size=0), generator_config_of(CONFIG.replace(conv_kernel_size=0))),
            "classification": lambda: DebertaForSequenceClassification(CONFIG, num_labels=3),
            "entity_scoring": lambda: DebertaForEntityScoring(CONFIG)}


def classes(model):
    return [type(m) for m in model.modules()]


@pytest.mark.parametrize("kind", sorted(builders()))
def test_the_converter_keeps_every_parameter_object_and_key(kind):
    model = builders()[kind]()
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fast.FastAttention not in classes(model)  # the plain model: nothing fast in it
    assert convert.apply(model, "eager") is model  # in place
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[name] for name, p in model.named_parameters())  # the same objects, not copies
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    swapped = classes(model)
    assert Linear not in swapped and nn.Dropout in swapped  # only the attention probabilities' dropout stays
    assert swapped.count(nn.Dropout) == classes(model).count(fast.FastAttention)
    for needed in (fast.FastAttention, fast.AutocastKeepLinear, fast.CheapDropout, fast.ActivatedLinear,
                   fast.PreActivationIntermediate):
        assert needed in swapped, needed
    copy.deepcopy(model)  # a converted model still copies (nothing uncopyable kept on it)


def test_the_converter_swaps_the_mlm_pieces_and_leaves_what_it_is_told_to():
    model = convert.apply(DebertaForMaskedLM(CONFIG), "sdpa", fuse_qkv=False, autocast_linear=False)
    attentions = [m for m in model.modules() if isinstance(m, DisentangledSelfAttention)]
    assert attentions and all(type(m) is fast.FastAttention and not m.fuse_qkv for m in attentions)
    assert fast.AutocastKeepLinear not in classes(model) and fast.FastLMHead not in classes(model)
    assert Linear in classes(model) and model.loss_function is not DebertaForMaskedLM(CONFIG).loss_function
    plain = convert.apply(DebertaForMaskedLM(CONFIG), "math", fuse_qkv=False, autocast_linear=False,
                          recompute_activation=False, cheap_dropout=False, float_cross_entropy=False)
    assert set(classes(plain)) == set(classes(DebertaForMaskedLM(CONFIG)))  # nothing asked: nothing swapped
    full = convert.apply(DebertaForMaskedLM(CONFIG))
    assert type(full.lm_predictions.lm_head) is fast.FastLMHead
    assert all(m.fuse_qkv for m in full.modules() if isinstance(m, fast.FastAttention))


def test_the_plain_model_has_transformers_layout_and_torch_modules():
    """The activation sits in Intermediate (act(dense(x))), as in transformers; Linear is nn.Linear's forward,
    dropout nn.Dropout; converting twice changes nothing more."""
    model = DebertaForMaskedLM(CONFIG)
    layer = model.deberta.encoder.layer[0]
    assert type(layer.intermediate) is Intermediate and isinstance(layer.intermediate.act, nn.GELU)
    assert type(layer.output.dense) is Linear and Linear.forward is nn.Linear.forward
    assert {type(m) for m in model.modules() if isinstance(m, nn.Dropout)} == {nn.Dropout}
    x = torch.randn(2, 3, CONFIG.hidden_size)
    assert torch.equal(layer.intermediate(x), torch.nn.functional.gelu(layer.intermediate.dense(x)))
    convert.apply(model)
    act_fn = layer.output.dense.act_fn
    convert.apply(model)
    assert layer.output.dense.act_fn == act_fn and type(layer.intermediate) is fast.PreActivationIntermediate


def test_an_unknown_attention_impl_is_refused():
    with pytest.raises(ValueError, match="flash"):
        convert.apply(DebertaForMaskedLM(CONFIG), "flash")


def test_import_model_imports_no_triton_and_model_names_no_distributed_runtime():
    code = ("import sys, model, model.fast.convert, model.fast.attention_paths; "
            "print([m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'deepspeed'))])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.stdout.strip() == "[]", out.stdout
    for folder, _, files in os.walk(os.path.join(ROOT, "model")):
        for name in (f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                text = f.read()
            assert "ds_id" not in text and "deepspeed" not in text, os.path.join(folder, name)
