"""Files that load safely but hold the wrong thing: trained weights with impossible values, run
checkpoints crafted with the wrong content, target profiles that are not what their keys say. Each is
one line and exit 2, naming the file and the field (docs/reliability.md)."""

import shutil

import pytest
import torch

from qat_sadam.cli import main
from qat_sadam.errors import ValidationError
from qat_sadam.export import load_target
from qat_sadam.models import build_model


def _small_cnn_state() -> dict:
    """The float weights quickstart_finetune's model takes (small_cnn, width 32, digits)."""
    return build_model("small_cnn", 10, image_size=8, in_channels=1, width=32).state_dict()


def _bn_var(sd: dict) -> str:
    return next(k for k in sd if k.endswith("running_var"))


def _first_weight(sd: dict) -> str:
    return next(k for k in sd if k.endswith("weight"))


WEIGHTS = [
    ("nan", lambda sd: sd[_first_weight(sd)].fill_(float("nan")), "holds non-finite values (NaN or inf)"),
    ("inf", lambda sd: sd[_first_weight(sd)].view(-1)[0].fill_(float("inf")), "holds non-finite values"),
    ("negative running_var", lambda sd: sd[_bn_var(sd)].fill_(-1.0), "has a negative BatchNorm variance (-1)"),
    ("nan running_var", lambda sd: sd[_bn_var(sd)].fill_(float("nan")), "holds non-finite values"),
    ("complex", lambda sd: sd.update({_first_weight(sd): sd[_first_weight(sd)].to(torch.complex64)}), "is complex"),
    ("sparse", lambda sd: sd.update({_first_weight(sd): sd[_first_weight(sd)].to_sparse()}), "is a sparse tensor"),
]


@pytest.mark.parametrize("name,damage,message", WEIGHTS, ids=[w[0] for w in WEIGHTS])
def test_trained_weights_with_impossible_values_are_refused_naming_the_file(name, damage, message, tmp_path, capsys):
    sd = _small_cnn_state()
    damage(sd)
    path = tmp_path / "float.pt"
    torch.save(sd, path)
    code = main(["ptq", "quickstart_finetune", "--set", f"model.checkpoint={path}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(path) in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("crafted") / "run"
    sets = ["epochs=1", "data.subset=64", "export.enabled=false", "logging.tensorboard=false"]
    argv = ["train", "quickstart", "--out", str(run), "--quiet", *(a for s in sets for a in ("--set", s))]
    assert main(argv) == 0
    return run


CRAFTED = [
    (
        "recipe a string",
        lambda ck: ck.update(recipe="hello"),
        "its recipe is not valid (a saved recipe must be a mapping",
    ),
    ("recipe without data", lambda ck: ck["recipe"].pop("data"), "the saved recipe has no 'data' section"),
    ("unknown model", lambda ck: ck["recipe"]["model"].update(name="nosuchnet"), "nosuchnet"),
    ("no info", lambda ck: ck.pop("info"), "info.num_classes missing or of the wrong type"),
    (
        "floats in the model state",
        lambda ck: ck.update(model={k: 1.0 for k in ck["model"]}),
        "is a float, not a tensor",
    ),
    ("recipe key of the wrong type", lambda ck: ck["recipe"]["data"].update(batch_size="x"), "'data.batch_size'"),
]


@pytest.mark.parametrize("name,craft,message", CRAFTED, ids=[c[0] for c in CRAFTED])
@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_crafted_run_checkpoint_is_one_line_naming_the_field(
    finished_run, command, name, craft, message, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for which in ("best.pt", "last.pt"):
        path = run / "checkpoints" / which
        ck = torch.load(path, weights_only=True)
        craft(ck)
        torch.save(ck, path)
    assert main([command, str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


TARGETS = [
    ("malformed YAML", "opset: [17\n", "not a readable YAML target profile"),
    ("opset text", "opset: abc\n", "key 'opset' must be an integer, got 'abc'"),
    ("checks a number", "checks: 5\n", "key 'checks' must be a list of names, got 5"),
    ("fixed_batch negative", "fixed_batch: -1\n", "key 'fixed_batch' must be a positive integer or null, got -1"),
    ("unknown provider", "providers: [NoSuchProvider]\n", "unknown ONNX Runtime provider 'NoSuchProvider'"),
    ("unknown key", "opsets: 17\n", "unknown key 'opsets'"),
]


@pytest.mark.parametrize("name,text,message", TARGETS, ids=[t[0] for t in TARGETS])
def test_a_bad_target_profile_names_the_key(name, text, message, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ValidationError, match=message.replace("[", r"\[")) as e:
        load_target(str(path))
    assert "\n" not in str(e.value)


def test_a_target_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_bytes(b"opset: 17\ndescription: \xff\xfe\n")
    with pytest.raises(ValidationError, match="not a readable YAML target profile"):
        load_target(str(path))
