"""The CLI on bad input (issue 15): every load failure and bad argument is one line on stderr
naming the file or option, exit code 2, no traceback; one rule for prompt files."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dspark
from dspark.cli import main
from dspark.train.data import read_prompt_texts
from dspark.train.evaluate import prompts_from

from helpers import make_checkpoint

V = 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli_target"))
    make_checkpoint(path, "llama", vocab=V, hidden=32, layers=1, heads=2, kv_heads=1, inter=48)
    return path


def broken_copy(ckpt, tmp_path):
    out = str(tmp_path / "broken")
    shutil.copytree(ckpt, out)
    return out


def generate(capsys, target, *extra):
    rc = main(["generate", "--target", target, "--ngram", "2", "--prompt", "w1 w2",
               "--max-new-tokens", "4", "--no-progress", *extra])
    return rc, capsys.readouterr()


def assert_one_line_error(rc, captured, *needles):
    err = captured.err.strip()
    assert rc == 2, (rc, captured)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("dspark ") and ": error: " in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("suffix, extra_cols, needles", [
    ("mlp.down_proj.weight", 3, ("shape",)),  # a wrong-shaped tensor
    ("self_attn.k_proj.weight", 1, ()),  # q/k/v parts that cannot be fused
])
def test_wrong_shaped_tensor_names_the_file(ckpt, tmp_path, capsys, suffix, extra_cols, needles):
    bad = broken_copy(ckpt, tmp_path)
    file = os.path.join(bad, "model.safetensors")
    sd = load_file(file)
    name = next(k for k in sd if k.endswith(suffix))
    sd[name] = torch.zeros(sd[name].shape[0], sd[name].shape[1] + extra_cols)
    save_file(sd, file)
    assert_one_line_error(*generate(capsys, bad, "--device", "cpu"), file, *needles)


def test_truncated_safetensors_names_the_file(ckpt, tmp_path, capsys):
    bad = broken_copy(ckpt, tmp_path)
    file = os.path.join(bad, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    assert_one_line_error(*generate(capsys, bad, "--device", "cpu"), file)


@pytest.mark.parametrize("name,text", [("config.json", "{\"model_type\": \"llama\", "),
                                       ("tokenizer.json", "{oops"),
                                       ("generation_config.json", "[1, 2")])
def test_corrupt_json_names_the_file(ckpt, tmp_path, capsys, name, text):
    bad = broken_copy(ckpt, tmp_path)
    with open(os.path.join(bad, name), "w") as f:
        f.write(text)
    assert_one_line_error(*generate(capsys, bad, "--device", "cpu"), os.path.join(bad, name))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_device_cuda_without_gpu(ckpt, capsys):
    assert_one_line_error(*generate(capsys, ckpt, "--device", "cuda"), "--device cuda",
                          "no CUDA GPU")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "banana"])
def test_device_that_is_not_one(ckpt, capsys, device):
    assert_one_line_error(*generate(capsys, ckpt, "--device", device), "--device")


def test_missing_prompt_file(ckpt, tmp_path, capsys):
    missing = str(tmp_path / "missing.txt")
    assert_one_line_error(*generate(capsys, ckpt, "--device", "cpu", "--prompt", "@" + missing),
                          missing)


@pytest.mark.parametrize("gamma", ["64", "1000"])
def test_gamma_upper_bound(ckpt, capsys, gamma):
    assert_one_line_error(*generate(capsys, ckpt, "--device", "cpu", "--gamma", gamma),
                          f"gamma {gamma}", "at most 64")


@pytest.mark.parametrize("rows", ["0", "-1"])
def test_fused_max_rows_bound(ckpt, capsys, rows):
    assert_one_line_error(*generate(capsys, ckpt, "--device", "cpu", "--fused-max-rows", rows),
                          "fused_max_rows", f"got {rows}")


def test_step_overhead_bound(ckpt, capsys):
    assert_one_line_error(*generate(capsys, ckpt, "--device", "cpu", "--schedule", "sync",
                                    "--step-overhead", "-1"), "step overhead must be")


def test_gamma_63_runs(ckpt, capsys):
    rc, captured = generate(capsys, ckpt, "--device", "cpu", "--gamma", "63")
    assert rc == 0, captured.err


def test_train_commands_name_bad_devices_and_files(ckpt, tmp_path, capsys):
    rc = main(["eval-draft", "--target", ckpt, "--drafter", str(tmp_path), "--data",
               str(tmp_path / "none.txt"), "--device", "cuda:99"])
    assert_one_line_error(rc, capsys.readouterr(), "--device cuda:99")
    rc = main(["bench", "--target", ckpt, "--ngram", "2", "--dataset", "x.jsonl", "--device",
               "nope"])
    assert_one_line_error(rc, capsys.readouterr(), "--device")
    missing = str(tmp_path / "none.jsonl")  # a good device: the missing file is named
    rc = main(["bench", "--target", ckpt, "--ngram", "2", "--dataset", missing, "--device",
               "cpu", "--no-progress"])
    assert_one_line_error(rc, capsys.readouterr(), missing)


# ---- one rule for prompt files -----------------------------------------------------------------
def write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def test_prompt_file_rule(tmp_path):
    """*.jsonl: one prompt per record (its first turn / prompt / text); any other file: one
    prompt per non-empty line, for `generate --prompt @F` and `eval-draft --data F` alike."""
    txt = write(tmp_path / "p.txt", ["w1 w2 w3", "", "w4 w5", "   ", "w6"])
    jsonl = write(tmp_path / "p.jsonl", [json.dumps({"turns": ["w7 w8", "w9"]}),
                                         json.dumps({"prompt": "w10"}), "",
                                         json.dumps({"text": "w11 w12"})])
    assert read_prompt_texts([txt]) == ["w1 w2 w3", "w4 w5", "w6"]
    assert read_prompt_texts([jsonl]) == ["w7 w8", "w10", "w11 w12"]
    bad = write(tmp_path / "bad.jsonl", ["{\"turns\": [\"w1\"]}", "nope"])
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_prompt_texts([bad])


def test_generate_and_eval_draft_read_the_same_prompts(ckpt, tmp_path, capsys):
    txt = write(tmp_path / "p.txt", ["w1 w2 w3", "w4 w5", "w6"])
    from dspark.models import load_tokenizer
    tok = load_tokenizer(ckpt)
    want = [tok.encode(t).ids for t in read_prompt_texts([txt])]
    assert prompts_from([txt], tok) == want
    rc = main(["generate", "--target", ckpt, "--ngram", "2", "--prompt", "@" + txt,
               "--max-new-tokens", "3", "--device", "cpu", "--json", "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["speculative"]["text"]) == 3


def test_source_tree_is_not_imported():
    """The tests run against the installed package (scripts/test.sh runs from tests/), not the
    source tree (which an in-place build can also leave a _build_info.py in)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(dspark.__file__)))
    assert not os.path.isfile(os.path.join(root, "CMakeLists.txt")), root
