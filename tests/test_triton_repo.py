"""`gptdeploy triton`'s model repository without a server (these need no serve extra): it holds every file
it needs and no path outside itself, and of the export only what the model runs; the step model's
config.pbtxt matches the ONNX graph; the triton and serve commands refuse bad options in one line. Served
by a real Triton server: tests/test_serve.py."""

from __future__ import annotations

import re

import pytest

from gptdeploy.app.triton_repo import RepoSettings, write_repository

NAME = "shakespeare"  # the model's name in the shared repository (conftest.triton_repository)


def test_repository_holds_everything_it_needs(triton_repository, shakespeare_folder):
    repo, folder = triton_repository, shakespeare_folder
    files = [p for p in repo.rglob("*") if p.is_file()]
    assert not [p for p in repo.rglob("*") if p.is_symlink()]
    names = {str(p.relative_to(repo)) for p in files}
    assert {f"{NAME}/config.pbtxt", f"{NAME}/1/model.py", f"{NAME}/1/export/gptdeploy.json",
            f"{NAME}/1/export/onnx/model.onnx", f"{NAME}/1/gptdeploy/app/batching.py",
            f"{NAME}_step/config.pbtxt", f"{NAME}_step/1/model.onnx", "README.md"} <= names
    text = "".join(p.read_text() for p in files if p.suffix in (".pbtxt", ".md", ".py"))
    assert str(folder.path) not in text and "site-packages" not in text
    readme = (repo / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "InferenceService" in readme


@pytest.mark.parametrize("variant", [None, "int8"])
def test_repository_holds_the_variant_it_serves_and_no_other(shakespeare_optimized_path, tmp_path, variant):
    """The export's copy in the repository: the graphs and side files, the one variant served (none by default),
    no other variant; its own manifest lists just those, and they verify against it."""
    from gptdeploy.export_folder import read_export, verify

    source = read_export(shakespeare_optimized_path)
    repo = write_repository(source, tmp_path / "repo", RepoSettings(NAME, variant=variant))
    copy = read_export(repo / NAME / "1" / "export")
    verify(copy)
    held = {str(p.relative_to(copy.path)) for p in copy.path.rglob("*") if p.is_file()}
    assert held == set(copy.manifest["files"]) | {"gptdeploy.json"}
    assert list(copy.variants) == ([variant] if variant else [])
    others = {entry["file"] for name, entry in source.variants.items() if name != variant}
    assert others and not others & held
    assert {spec["file"] for spec in source.manifest["graphs"].values()} <= held
    if variant:
        assert source.variants[variant]["file"] in held


def test_step_config_matches_the_onnx_graph(triton_repository):
    """The onnxruntime-backend model cannot load in the pip server: its config is checked against the graph."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient (the serve extra) reads config.pbtxt")
    repo = triton_repository
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    config = text_format.Parse((repo / f"{NAME}_step" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.backend == "onnxruntime" and config.max_batch_size == 0
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    graph = onnx.load(repo / f"{NAME}_step" / "1" / "model.onnx", load_external_data=False).graph
    types = {onnx.TensorProto.INT64: mc.TYPE_INT64, onnx.TensorProto.FLOAT: mc.TYPE_FP32,
             onnx.TensorProto.FLOAT16: mc.TYPE_FP16}
    initializers = {i.name for i in graph.initializer}
    for side, tensors in (("input", [i for i in graph.input if i.name not in initializers]),
                          ("output", list(graph.output))):
        configured = {t.name: t for t in getattr(config, side)}
        assert set(configured) == {t.name for t in tensors}, side
        for t in tensors:
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.type.tensor_type.shape.dim]
            assert list(configured[t.name].dims) == dims, t.name
            assert configured[t.name].data_type == types[t.type.tensor_type.elem_type], t.name


def test_triton_command(shakespeare_folder, tmp_path, capsys):
    folder = shakespeare_folder
    from gptdeploy.app.cli import run

    out = tmp_path / "repo"
    assert run(["triton", str(folder.path), "--out", str(out), "--name", "bard", "--instances", "2",
                "--runtime", "trt"]) == 0
    assert "bard_step (onnxruntime backend)" in capsys.readouterr().out
    assert "count: 2, kind: KIND_GPU" in (out / "bard" / "config.pbtxt").read_text()
    assert 'name: "tensorrt"' in (out / "bard_step" / "config.pbtxt").read_text()
    assert run(["triton", str(folder.path), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert run(["triton", str(folder.path), "--out", str(out), "--force"]) == 0  # its own repository: replaced
    capsys.readouterr()
    mine = tmp_path / "mine"  # a user's folder: --force never deletes it
    mine.mkdir()
    (mine / "thesis.txt").write_text("mine")
    assert run(["triton", str(folder.path), "--out", str(mine), "--force"]) == 2
    err = capsys.readouterr().err
    assert "not a model repository that gptdeploy wrote" in err and len(err.strip().splitlines()) == 1
    assert (mine / "thesis.txt").read_text() == "mine"
    assert run(["triton", str(folder.path), "--out", str(tmp_path / "huge"), "--huge-pages"]) == 0
    capsys.readouterr()
    config = (tmp_path / "huge" / "shakespeare" / "config.pbtxt").read_text()
    assert re.search(r'key: "huge_pages"\s*value: \{\s*string_value: "1"', config), config
    for bad, says in ((["--runtime", "torch"], "--runtime 'torch'"), (["--instances", "0"], "--instances"),
                      (["--name", "../x"], "--name"), (["--runtime", "trt", "--huge-pages"], "--huge-pages")):
        assert run(["triton", str(folder.path), "--out", str(tmp_path / "other"), *bad]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1


def test_serve_refuses_bad_options_in_one_line(shakespeare_folder, capsys):
    folder = shakespeare_folder
    from gptdeploy.app.cli import run

    for bad, says in ((["--http-port", "8000", "--grpc-port", "8000"], "must differ"),
                      (["--metrics-port", "70000"], "out of range"), (["--max-batch", "0"], "--max-batch"),
                      (["--threads", "-1"], "--threads")):
        assert run(["serve", str(folder.path), *bad]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
