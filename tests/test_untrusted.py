"""Checkpoints from someone else (issue 15): no unpickling of arbitrary objects, no weight files
outside the checkpoint dir, configs validated (one line naming the field, fast) before anything
is built from them."""
import json
import os
import shutil
import time

import pytest
import torch

from dspark.cli import main
from dspark.drafters import DrafterSpec, build_draft_model, load_drafter, save_drafter
from dspark.models import ModelConfig, load_model
from dspark.train.data import Sample
from dspark.train.trainer import TrainConfig, train_drafter

from helpers import make_checkpoint

V = 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("untrusted_target"))
    make_checkpoint(path, "qwen3", vocab=V, hidden=32, layers=2, heads=2, kv_heads=1, inter=48,
                    head_dim=8)
    return path


def edited_config(ckpt, tmp_path, **fields):
    out = str(tmp_path / "edited")
    shutil.copytree(ckpt, out)
    file = os.path.join(out, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    cfg.update(fields)
    with open(file, "w") as f:
        json.dump(cfg, f)
    return out, file


@pytest.mark.parametrize("field,value", [
    ("num_hidden_layers", 100000), ("num_hidden_layers", 10**15), ("num_attention_heads", 0),
    ("hidden_size", -64), ("vocab_size", 1 << 30), ("intermediate_size", "96"),
    ("num_key_value_heads", 3), ("head_dim", 7), ("max_position_embeddings", 0),
    ("rms_norm_eps", -1.0), ("num_hidden_layers", True)])
def test_config_fields_are_validated_first(ckpt, tmp_path, capsys, field, value):
    path, file = edited_config(ckpt, tmp_path, **{field: value})
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as err:
        load_model(path)
    assert time.perf_counter() - t0 < 0.5
    msg = str(err.value)
    assert msg.startswith(file) and len(msg.splitlines()) == 1, msg
    named = {"num_key_value_heads": "num_attention_heads"}.get(field, field)
    assert named in msg, msg
    rc = main(["generate", "--target", path, "--ngram", "2", "--prompt", "w1", "--device",
               "cpu", "--no-progress"])
    err_text = capsys.readouterr().err.strip()
    assert rc == 2 and len(err_text.splitlines()) == 1 and named in err_text, err_text


def test_config_missing_field_is_named():
    d = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
         "num_attention_heads": 2}
    with pytest.raises(ValueError, match="num_hidden_layers is missing"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd",
                                  "sub/../../outside.safetensors"])
def test_index_naming_files_outside_the_dir_is_refused(ckpt, tmp_path, name):
    out = str(tmp_path / "sharded")
    os.makedirs(out)
    for f in os.listdir(ckpt):
        shutil.copy(os.path.join(ckpt, f), out)
    shutil.copy(os.path.join(ckpt, "model.safetensors"), str(tmp_path / "outside.safetensors"))
    os.remove(os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"embed_tokens.weight": name}}, f)
    with pytest.raises(ValueError, match="outside the checkpoint dir"):
        load_model(out)


def test_sharded_checkpoint_inside_the_dir_loads(tmp_path):
    make_checkpoint(str(tmp_path), "llama", vocab=V, hidden=32, layers=2, shard="20KB")
    assert os.path.isfile(os.path.join(tmp_path, "model.safetensors.index.json"))
    assert load_model(str(tmp_path)).config.num_layers == 2


def test_drafter_config_is_validated(ckpt, tmp_path):
    target = load_model(ckpt)
    spec = DrafterSpec.for_target(target.config, "dspark", gamma=3, mask_token_id=V - 1,
                                  num_draft_layers=1, markov_rank=8)
    out = str(tmp_path / "drafter")
    save_drafter(build_draft_model(spec, target), out)
    file = os.path.join(out, "drafter_config.json")
    good = json.load(open(file))
    for field, value in (("num_draft_layers", 100000), ("gamma", "7"), ("markov_rank", -2)):
        with open(file, "w") as f:
            json.dump({**good, field: value}, f)
        with pytest.raises(ValueError, match=field) as err:
            load_drafter(out, target)
        assert str(err.value).startswith(file)
    with open(file, "w") as f:
        json.dump({**good, "target": {**good["target"], "num_heads": 0}}, f)
    with pytest.raises(ValueError, match="num_attention_heads"):
        load_drafter(out, target)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_trainer_checkpoint_loads_without_pickle(ckpt, tmp_path):
    """trainer.pt holds plain tensors/containers: resume reads it with weights_only=True, and a
    checkpoint carrying a pickled object is refused with one line naming the file."""
    target = load_model(ckpt)
    spec = DrafterSpec.for_target(target.config, "dspark", gamma=3, mask_token_id=V - 1,
                                  num_draft_layers=1, markov_rank=8)
    samples = [Sample(list(range(1, 20)), [0] * 4 + [1] * 15, 4)] * 4
    cfg = TrainConfig(steps=3, batch_size=2, num_anchors=4, progress=False, save_every=0,
                      stop_after=2)
    out = str(tmp_path / "run")
    train_drafter(target, spec, samples, cfg, out, log=lambda s: None)
    path = os.path.join(out, "checkpoint", "trainer.pt")
    state = torch.load(path, weights_only=True)  # plain data: loads without unpickling objects
    assert state["step"] == 2
    cfg.stop_after = None
    _, hist = train_drafter(target, spec, samples, cfg, out, resume=True, log=lambda s: None)
    assert hist[-1]["step"] == 3
    state["spec"] = {"evil": _Boom()}
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        train_drafter(target, spec, samples, cfg, out, resume=True, log=lambda s: None)
    assert str(err.value).startswith(path) and len(str(err.value).splitlines()) == 1
