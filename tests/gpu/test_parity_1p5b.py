"""The full 1.5B (xxlarge) forward on CUDA, ours against transformers' DebertaV2Model on the same random weights,
fp32, 2 x 512 tokens with the last sequence padded from position 400: the last hidden state within 1e-4 on
valid tokens (measured 1.22e-5 on an H200, largest |value| about 4). Needs a CUDA GPU (tests/gpu/conftest.py).

transformers builds and initialises the model on the GPU; ours is built on the meta device and takes
transformers' tensors themselves (keys mapped by model/state_dict_adapter.py, then a strict load with
assign=True: every key present, every shape equal), so the weights exist once (about 6.5 GB).
"""
import pytest
import torch

from model import DebertaModel, preset
from model import state_dict_adapter as keys
from model.fast import convert


def shared_models(config):
    """(transformers' model, ours on the same tensors), both in eval mode on CUDA."""
    import transformers
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise where it runs: no second copy on the way
        theirs = transformers.DebertaV2Model(transformers.DebertaV2Config(**config.to_dict())).eval()
    with torch.device("meta"):
        ours = DebertaModel(config)
    state = keys.from_release_state(theirs.state_dict())  # transformers' keys -> ours (release layout)
    expected = {keys.to_release(k, "base") for k in ours.state_dict()}
    assert not set(state) - expected, f"transformers has keys ours lacks: {sorted(set(state) - expected)[:10]}"
    own = {keys.to_model(k, "base"): state[k] for k in expected if k in state}
    ours.load_state_dict(own, strict=True, assign=True)  # strict: every key; shapes are checked too
    return theirs, convert.apply(ours, config.attention_impl).eval()


@pytest.mark.parametrize("attention_impl", ["eager"])
def test_the_1p5b_forward_equals_transformers_on_cuda(attention_impl):
    config = preset("xxlarge", attention_impl=attention_impl)
    theirs, ours = shared_models(config)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, config.vocab_size, (2, 512), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, 400:] = 0
    ids[-1, 400:] = 0
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    difference = (got - expected)[valid].abs().max().item()
    assert difference <= 1e-4, f"max |ours - transformers| {difference:.3e} (largest |value| " \
                               f"{expected[valid].abs().max().item():.2f})"
