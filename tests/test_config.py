import pytest

from fisherkd.config import ConfigError, build_config, load_config

BASE = {"student": {"name": "mlp"}, "teacher": {"name": "cnn1d"}}


def test_defaults_and_overrides():
    config = build_config(BASE, ["train.epochs=3", "train.optimizer.lr=0.1", "methods=[{name: kd}]"])
    assert config.train.epochs == 3 and config.train.optimizer.lr == 0.1
    assert [m.name for m in config.methods] == ["kd"]
    config = build_config({**BASE, "methods": [{"name": "ce"}, {"name": "kd"}]}, ["methods.1.temperature=2"])
    assert config.methods[1].hparams == {"temperature": 2}


@pytest.mark.parametrize(
    ("raw", "overrides", "message"),
    [
        ({**BASE, "trian": {}}, [], "config error at trian: unknown key; did you mean: train"),
        (BASE, ["train.optimizer.lrr=3"], "config error at train.optimizer.lrr: unknown key; did you mean: lr"),
        (BASE, ["train.epochs=abc"], "config error at train.epochs: Input should be a valid integer"),
        (BASE, ["train.optimizer.name=lion"], "config error at train.optimizer.name: Input should be 'sgd'"),
        ({**BASE, "methods": [{"name": "kdd"}]}, [], "error at methods.0: unknown method 'kdd'; did you mean: kd"),
        ({**BASE, "methods": [{"name": "kd", "temprature": 1}]}, [], "methods.0: method 'kd' has no hyper-param"),
        ({"student": {"name": "mlp"}, "methods": [{"name": "kd"}]}, [], "method 'kd' needs a teacher"),
        (BASE, ["train.epochs"], "override 'train.epochs' is not key=value"),
        ({**BASE, "methods": [{"name": "ce"}]}, ["methods.7.weight=1"], "override 'methods.7.weight': no such"),
    ],
)
def test_errors_name_the_key_path(raw, overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config(raw, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text(f"student: !!python/object/apply:os.makedirs ['{tmp_path / 'pwned'}']\n")
    with pytest.raises(ConfigError, match=r"evil.yaml': the tag '!!python/object/apply:os.makedirs' at line 1"):
        load_config(path)
    assert not (tmp_path / "pwned").exists()  # no code from the file ran
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
