"""`deberta-ds convert` on real training checkpoints: 2-rank ZeRO-3 and 2-stage pipeline runs of the tiny model
(torchrun, gloo), DeepSpeed's own universal conversion, and releases started from with init_from_release.
transformers is the oracle for the releases; DeepSpeed's zero_to_fp32 for the ZeRO-3 weights."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from tests.helpers.hf_oracle import hf_config
from model import DebertaForMaskedLM, preset
from pipeline.release import load_release
from pipeline.release.read import read_state_dict
from pipeline.release.write import write_config
from pipeline.cli import main as cli_main
from tests.helpers.launch import NO_DROPOUT, PIPE, ROOT, cli, explain, losses, pretrain, run_env

# the tiny run's model (configs/pretrain_tiny_cpu.json) without dropout, so losses are reproducible here
CONFIG = preset("tiny", vocab_size=1100, max_position_embeddings=128, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
SHORT = NO_DROPOUT + ["max_steps=2", "save_interval=2"]
PIPE_SETS = ["mode=pipeline", "pipeline_stages=2"]
FROZEN = NO_DROPOUT + ["max_steps=1", "save_interval=1", "lr=0"]  # one real step that changes no weight


def to_release(checkpoint, output, *extra):
    """In process: `deberta-ds convert to-release ...` through the CLI; returns the exit code."""
    return cli_main(["convert", "to-release", "--checkpoint", str(checkpoint), "--output", str(output), *extra])


def same_tensors(a_dir, b_dir):
    a, b = read_state_dict(str(a_dir)), read_state_dict(str(b_dir))
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    return a


def no_leftovers(parent):
    return not [n for n in os.listdir(parent) if n.startswith((".tmp-", ".old-"))]


# ---------------------------------------------------------------- module fixtures: releases and real runs
@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A random tiny MLM (with the EMD's position table) in the published microsoft/deberta-v2-xxlarge
    layout: config.json + pytorch_model.bin with lm_predictions.* and the position table."""
    official = tmp_path_factory.mktemp("start") / "official"
    official.mkdir()
    torch.manual_seed(7)
    model = DebertaForMaskedLM(CONFIG, emd=True).eval()
    write_config(str(official), CONFIG, "mlm", torch.float32)
    torch.save(model.state_dict(), official / "pytorch_model.bin")  # MLM: release keys are the model's
    return {"official": official}


@pytest.fixture(scope="module")
def zero3_run(tiny_shards, start, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3_run")
    result = pretrain(tiny_shards, out, nproc=2, sets=SHORT + [f"init_from_release={start['official']}"])
    assert result.returncode == 0, explain(result)
    return out


@pytest.fixture(scope="module")
def pipe_run(tiny_shards, zero3_release, tmp_path_factory):
    """The zero3 run moved to a 2-stage pipeline: its release (ours: safetensors) -> init_from_release. With
    lr 0 the step leaves the weights alone, so what comes out must equal what went in."""
    out = tmp_path_factory.mktemp("pipe_run")
    result = pretrain(tiny_shards, out, nproc=2, ds=PIPE, sets=FROZEN + PIPE_SETS + [f"init_from_release={zero3_release}"])
    assert result.returncode == 0, explain(result)
    return out


@pytest.fixture(scope="module")
def zero3_release(zero3_run, tmp_path_factory):
    """The Slurm scripts' form, as a real command: convert to-release --checkpoint RUN/checkpoints --output DIR."""
    out = tmp_path_factory.mktemp("zero3_release") / "release"
    result = cli("convert", "to-release", "--checkpoint", str(zero3_run / "checkpoints"), "--output", str(out),
                 "--verify")
    assert result.returncode == 0, explain(result)
    assert "verify: transformers vs deberta-ds MLM logits" in result.stderr
    assert "tensors/s" in result.stderr and "GB/s" in result.stderr
    return out


@pytest.fixture(scope="module")
def pipe_release(pipe_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe_release") / "release"
    assert to_release(pipe_run / "checkpoints", out, "--verify") == 0
    return out


# ---------------------------------------------------------------- release -> training
def expected_step1_loss(tiny_shards, release, dp_size, micro_batches):
    """Our plain model (load_release) on the micro-batches of global batch 1, as the run's ranks read them."""
    from pipeline.data.mlm_loader import build_pretrain_loader
    model = load_release(str(release), task="mlm")
    found = []
    for dp_rank in range(dp_size):
        loader = iter(build_pretrain_loader(str(tiny_shards), str(tiny_shards / "spm.model"), 4, dp_rank, dp_size, 1234))
        for _ in range(micro_batches):
            with torch.no_grad():
                found.append(model(**next(loader)).loss.item())
    return sum(found) / len(found)


def test_release_starts_zero3_run_with_the_plain_models_loss(zero3_run, start, tiny_shards):
    """Published layout (pytorch_model.bin, lm_predictions.*, position table) -> 2-rank ZeRO-3: step 1's loss
    is our plain model's on the same batch (2 ranks x 1 micro-batch)."""
    want = expected_step1_loss(tiny_shards, start["official"], dp_size=2, micro_batches=1)
    assert abs(losses(zero3_run)[1] - want) < 1e-5, (losses(zero3_run)[1], want)


def test_release_starts_pipeline_run_with_the_plain_models_loss(pipe_run, zero3_release, tiny_shards):
    """Our safetensors layout -> 2-stage pipeline: step 1's loss is the plain model's (1 pipe x 2 micro-batches)."""
    want = expected_step1_loss(tiny_shards, zero3_release, dp_size=1, micro_batches=2)
    assert abs(losses(pipe_run)[1] - want) < 1e-5, (losses(pipe_run)[1], want)


def test_legacy_and_official_layouts_give_the_same_training_weights(start, tmp_path):
    """init_from_release's loader (engine.load_release_into, ZeRO off) reads transformers' legacy cls.predictions.*
    layout and the official layout into the same model."""
    from pipeline.train.zero3 import load_release_into
    reference = load_release(str(start["official"]), task="mlm", emd=False)
    legacy = transformers.DebertaV2ForMaskedLM(hf_config(CONFIG, legacy=True)).eval()
    legacy.deberta.load_state_dict({k[len("deberta."):]: v for k, v in reference.state_dict().items()
                                    if k.startswith("deberta.")})
    head = reference.lm_predictions.lm_head
    legacy.cls.predictions.transform.dense.load_state_dict(head.dense.state_dict())
    legacy.cls.predictions.transform.LayerNorm.load_state_dict(head.LayerNorm.state_dict())
    legacy.cls.predictions.bias.data.copy_(head.bias)
    legacy.save_pretrained(str(tmp_path / "legacy"))
    assert any(k.startswith("cls.predictions.") for k in read_state_dict(str(tmp_path / "legacy")))
    for path in (start["official"], tmp_path / "legacy"):
        model = DebertaForMaskedLM(CONFIG, emd=False)
        load_release_into(model, str(path), stage=0, rank=0)
        for key, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (path, key)
    # the EMD needs the absolute position table, which transformers' layouts lack: a clear error
    with pytest.raises(ValueError, match="missing keys: deberta.embeddings.position_embeddings.weight"):
        load_release_into(DebertaForMaskedLM(CONFIG, emd=True), str(tmp_path / "legacy"), stage=0, rank=0)


# ---------------------------------------------------------------- training -> release
def test_zero3_release_is_what_transformers_and_deepspeed_see(zero3_release, zero3_run, tiny_shards):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    names = set(os.listdir(zero3_release))
    assert {"config.json", "model.safetensors", "spm.model", "tokenizer_config.json"} <= names
    values = json.loads((zero3_release / "config.json").read_text())
    assert values["model_type"] == "deberta-v2" and values["legacy"] is False
    state = read_state_dict(str(zero3_release))
    assert "deberta.embeddings.position_embeddings.weight" in state  # the EMD's table is kept
    # bitwise DeepSpeed's own consolidation of the fp32 master weights
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(zero3_run / "checkpoints"), tag="global_step2")
    assert set(theirs) == set(state)
    assert all(torch.equal(theirs[k], state[k]) for k in state)
    # transformers loads every key; the trained weights differ from the start (it did train)
    for auto in (transformers.AutoModel, transformers.AutoModelForMaskedLM):
        _, info = auto.from_pretrained(str(zero3_release), output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], (auto, info)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(zero3_release)).eval()
    ours = load_release(str(zero3_release), task="mlm", emd=False)
    ids = torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)
    # the tokenizer: transformers' reading of spm.model gives our ids, [MASK] included
    from pipeline.data.tokenizer import Tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(zero3_release))
    mine = Tokenizer(str(tiny_shards / "spm.model"))
    text = "Return the number of items in a container."
    assert tokenizer(text)["input_ids"] == mine.build_inputs(mine.encode(text))
    assert tokenizer.convert_tokens_to_ids("[MASK]") == mine.mask_id


def test_pipeline_release_reads_masters_and_layer_files_alike(pipe_release, pipe_run, tmp_path):
    # the ZeRO-1 fp32 partitions (default) and the layer_XX files (incl. the tied embedding in layer 0 and
    # the last layer) hold the same fp32 weights
    files = os.listdir(pipe_run / "checkpoints" / "global_step1")
    assert "layer_00-model_states.pt" in files and "layer_04-model_states.pt" in files
    assert to_release(pipe_run / "checkpoints", tmp_path / "layers", "--source", "layers") == 0
    state = same_tensors(pipe_release, tmp_path / "layers")
    assert "deberta.embeddings.position_embeddings.weight" in state
    _, info = transformers.AutoModelForMaskedLM.from_pretrained(str(pipe_release), output_loading_info=True)
    assert not info["missing_keys"]


def test_universal_checkpoint_converts_to_the_same_release(zero3_run, zero3_release, tmp_path):
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(zero3_run / "checkpoints", ckpt)
    result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             str(ckpt / "global_step2"), "--output_folder", str(ckpt / "global_step2_universal"),
                             "--num_extract_workers", "1", "--num_merge_workers", "1"],
                            cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert result.returncode == 0, explain(result)
    assert to_release(ckpt, tmp_path / "u", "--tag", "global_step2_universal") == 0
    same_tensors(zero3_release, tmp_path / "u")


def test_a_tag_is_found_inside_a_run_directory(zero3_run, zero3_release, tmp_path):
    assert to_release(zero3_run, tmp_path / "tagged", "--tag", "global_step2") == 0
    same_tensors(zero3_release, tmp_path / "tagged")


def test_bf16_and_fp16_sharded_releases(zero3_run, zero3_release, tmp_path):
    fp32 = read_state_dict(str(zero3_release))
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out = tmp_path / name
        assert to_release(zero3_run / "checkpoints", out, "--dtype", name, "--max-shard-size", "100KB") == 0
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
        state = read_state_dict(str(out))
        assert all(torch.equal(state[k], fp32[k].to(dtype)) for k in fp32)
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[name]
        hf, info = transformers.AutoModelForMaskedLM.from_pretrained(str(out), output_loading_info=True)
        assert not info["missing_keys"]


# ---------------------------------------------------------------- moving between modes, exact round trips
def test_zero3_run_moves_to_pipeline_and_back_with_exact_weights(zero3_release, pipe_release, tiny_shards, tmp_path):
    """A zero3 checkpoint -> release -> a 2-stage pipeline run -> its checkpoint -> release, then -> a 2-rank
    zero3 run -> release: with lr 0 the steps leave the weights alone, so each release that comes out equals
    the one that went in, bitwise (release -> training -> release is exact, in both modes)."""
    same_tensors(zero3_release, pipe_release)
    back = pretrain(tiny_shards, tmp_path / "to_zero3", nproc=2, sets=FROZEN + [f"init_from_release={pipe_release}"])
    assert back.returncode == 0, explain(back)
    assert to_release(tmp_path / "to_zero3" / "checkpoints", tmp_path / "zero3_out") == 0
    same_tensors(pipe_release, tmp_path / "zero3_out")


def test_converted_release_starts_fine_tuning(zero3_release):
    model = load_release(str(zero3_release), task="classification", num_labels=3)
    assert model(input_ids=torch.tensor([[1, 50, 60, 2]])).logits.shape == (1, 3)


# ---------------------------------------------------------------- bad input: a clear error, no output
def copy_checkpoint(run, tmp_path):
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints", ckpt)
    return ckpt


def refuses(capsys, checkpoint, output, message, *extra):
    assert to_release(checkpoint, output, *extra) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert not os.path.exists(output) and no_leftovers(os.path.dirname(output))
    return err


def test_bad_inputs_are_clear_errors_with_no_output(zero3_run, tiny_shards, tmp_path, capsys):
    out = tmp_path / "out"
    refuses(capsys, tiny_shards, out, "not a training checkpoint directory")
    refuses(capsys, zero3_run / "checkpoints", out, "tag 'global_step9' does not exist (found: global_step2)",
            "--tag", "global_step9")
    refuses(capsys, zero3_run, out, "tag 'global_step9' does not exist (found: global_step2)",  # a run directory
            "--tag", "global_step9")
    ckpt = copy_checkpoint(zero3_run, tmp_path)
    wrong = tmp_path / "wrong.model"
    wrong.write_bytes(b"not the tokenizer")
    refuses(capsys, ckpt, out, "is not the tokenizer this run trained with", "--tokenizer", str(wrong))
    # config and tensors disagree
    meta_file = ckpt / "global_step2" / "deberta_ds.json"
    meta = json.loads(meta_file.read_text())
    meta["model_config"]["intermediate_size"] = 96
    meta_file.write_text(json.dumps(meta))
    refuses(capsys, ckpt, out, "deberta.encoder.layer.0.intermediate.dense.weight has shape (128, 64) in the "
            "checkpoint but (96, 64) in its config")
    meta["model_config"]["intermediate_size"] = 128
    meta_file.write_text(json.dumps(meta))
    # a truncated optimizer partition is named
    optim = ckpt / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:5000])
    refuses(capsys, ckpt, out, "no complete checkpoint (global_step2 is damaged: " + str(optim) + ": 5000 bytes")
    refuses(capsys, ckpt, out, "zero_pp_rank_1_mp_rank_00_optim_states.pt: cannot read", "--tag", "global_step2")
    optim.unlink()
    refuses(capsys, ckpt, out, "ZeRO wrote 2 optimizer partitions but 1 files are there", "--tag", "global_step2")
    # an existing, non-empty output is not overwritten unless asked
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    for extra in ((), ("--overwrite",)):
        assert to_release(zero3_run / "checkpoints", tmp_path / "taken", *extra) == 1
        assert "exists and is not a release directory (keep.txt)" in capsys.readouterr().err
        assert (tmp_path / "taken" / "keep.txt").exists()


def test_truncated_pipeline_layer_file_is_named(pipe_run, tmp_path, capsys):
    ckpt = copy_checkpoint(pipe_run, tmp_path)
    layer = ckpt / "global_step1" / "layer_03-model_states.pt"
    layer.write_bytes(layer.read_bytes()[:3000])
    refuses(capsys, ckpt, tmp_path / "out", "layer_03-model_states.pt: 3000 bytes", "--source", "layers")
    refuses(capsys, ckpt, tmp_path / "out", "layer_03-model_states.pt: cannot read", "--source", "layers",
            "--tag", "global_step1")


def test_init_from_release_reads_each_tensor_once_and_only_on_rank_0_under_zero3(start, monkeypatch):
    """engine.load_release_into streams: headers for the checks, then one tensor per parameter, read right
    before its copy; under ZeRO-3 the other ranks read no tensor at all (GatheredParameters(modifier_rank=0)
    broadcasts rank 0's values: the 2-rank run above starts from this release with the plain model's loss).
    GatheredParameters is replaced here by a no-op so that one process can play both ranks."""
    import contextlib

    from pipeline.release import read as release
    from pipeline.train import zero3 as engine

    reads = []
    load = release.TensorRef.load
    monkeypatch.setattr(release.TensorRef, "load", lambda self: reads.append(self.key) or load(self))
    monkeypatch.setattr(engine.deepspeed.zero, "GatheredParameters", lambda *a, **k: contextlib.nullcontext())
    reference = load_release(str(start["official"]), task="mlm")
    reads.clear()
    for rank in (1, 0):
        model = DebertaForMaskedLM(CONFIG, emd=True)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        engine.load_release_into(model, str(start["official"]), stage=3, rank=rank)
        if rank == 1:
            assert reads == [] and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        else:
            names = [n for n, _ in model.named_parameters()]
            assert sorted(reads) == sorted(names)         # each parameter's tensor read exactly once
            assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_overwrite_replaces_only_a_release_and_never_the_training_run(zero3_run, zero3_release, tmp_path, capsys):
    """--overwrite onto the run that holds the checkpoint (or any directory that is no release) is refused and
    leaves it whole; over a previous release the new one replaces it once complete."""
    run = tmp_path / "run"
    shutil.copytree(zero3_run, run)
    before = sorted(os.listdir(run))
    assert to_release(run / "checkpoints", run, "--overwrite") == 1
    err = capsys.readouterr().err
    assert "exists and is not a release directory (checkpoints/, metrics.jsonl" in err, err
    assert sorted(os.listdir(run)) == before and no_leftovers(tmp_path)
    target = tmp_path / "release"
    shutil.copytree(zero3_release, target)
    (target / "model.safetensors").write_bytes(b"an older release")
    assert to_release(run / "checkpoints", target) == 1
    assert "a release is already there; give --overwrite" in capsys.readouterr().err
    assert to_release(run / "checkpoints", target, "--overwrite") == 0
    same_tensors(zero3_release, target)
    assert no_leftovers(tmp_path)


def test_a_convert_that_finishes_second_to_one_new_name_leaves_the_first_release(zero3_run, zero3_release, tmp_path,
                                                                                 capsys, monkeypatch):
    """Two converts to one new name, both past the check at the start: the other one renames its release into
    place while this one writes (played here by a copy made from inside this convert). Before, the second
    rename replaced the first release and both converts succeeded."""
    from pipeline.release import write
    target = tmp_path / "release"
    tokenizer_files = write.write_tokenizer_files

    def other_convert_finishes_first(out_dir, spm):
        tokenizer_files(out_dir, spm)
        shutil.copytree(zero3_release, target)
        (target / "README.md").write_text("the first release\n")

    monkeypatch.setattr(write, "write_tokenizer_files", other_convert_finishes_first)
    assert to_release(zero3_run / "checkpoints", target) == 1
    err = capsys.readouterr().err
    assert f"error: {target}: appeared while this output was written (another command wrote it)" in err
    assert "choose another name, or give --overwrite to replace it" in err
    assert (target / "README.md").read_text() == "the first release\n" and no_leftovers(tmp_path)
    same_tensors(zero3_release, target)


KILLED_CONVERT = """
import os, signal, sys
from pipeline.cli import main
from pipeline.release import write
write.write_tokenizer_files = lambda out_dir, spm: os.kill(os.getpid(), signal.SIGKILL)
main(["convert", "to-release", "--checkpoint", sys.argv[1], "--output", sys.argv[2]])
"""


def test_the_next_convert_to_a_name_removes_a_killed_converts_temporary_directory(zero3_run, zero3_release, tmp_path):
    """A convert killed after writing the weights (SIGKILL: no handler runs) leaves its full-size temporary
    directory; before, nothing removed it."""
    target = tmp_path / "release"
    killed = subprocess.run([sys.executable, "-c", KILLED_CONVERT, str(zero3_run / "checkpoints"), str(target)],
                            cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, explain(killed)
    left = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-release-")]
    assert len(left) == 1 and os.path.getsize(tmp_path / left[0] / "model.safetensors") > 100_000
    result = cli("convert", "to-release", "--checkpoint", str(zero3_run / "checkpoints"), "--output", str(target))
    assert result.returncode == 0, explain(result)
    assert f"{tmp_path / left[0]}: removed, a temporary output left by a process that ended" in result.stderr
    assert os.listdir(tmp_path) == ["release"]
    same_tensors(zero3_release, target)
