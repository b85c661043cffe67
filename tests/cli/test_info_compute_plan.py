"""``tbopt info FILE --compute-plan``: where Core ML runs each op (macOS 14.4+), a one-line refusal elsewhere.

As in tests/test_coreml_device.py, Core ML is stood in for off macOS: ``coreml_available`` says yes,
``MLModel`` loads without compiling, and ``MLComputePlan.load_from_path`` returns a plan built from
the file's own ops (coremltools' own structure classes), with norms placed on the CPU as the Neural
Engine does with a norm it does not take. The ``core ml`` case runs Core ML itself on a Mac.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinybeauty_cli.coreml import runner as cr
from tinybeauty_cli.coreml.spec import coremltools

from tests.coreml_helpers import StandInMLModel
from tests.helpers import assert_one_line_error, run

ct = coremltools()
cp = ct.models.compute_plan
cd = ct.models.compute_device
ON_MAC = cr.coreml_available()
#: ops the stand-in sends to the CPU (a norm the Neural Engine does not take)
OFF_NE = {"layer_norm", "instance_norm", "instanceNormalization", "mvn", "reduceMean"}


def _device(cls):
    return object.__new__(cls)  # the real classes, without Core ML's native proxy


class StandInModel(StandInMLModel):
    """tests/test_coreml_device.py's stand-in (predictions by the reference executor); its "compiled
    path" is the file itself."""

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.source = str(model) if isinstance(model, (str, Path)) else None

    def get_compiled_path(self):
        return self.source


class StandInPlan:
    """A plan over the file's own ops: norms on the CPU, the rest on the Neural Engine, constants none."""

    def __init__(self, path):
        spec = ct.utils.load_spec(path)
        self.nn = self.program = None
        if spec.WhichOneof("Type") == "mlProgram":
            block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
            ops = [cp.MLModelStructureProgramOperation(
                inputs={}, operator_name=op.type, blocks=[], __proxy__=None,
                outputs=[cp.MLModelStructureProgramNamedValueType(name=o.name, type=None) for o in op.outputs])
                for op in block.operations]
            fn = cp.MLModelStructureProgramFunction(inputs=[], block=cp.MLModelStructureProgramBlock(
                inputs=[], operations=ops, output_names=[]))
            self.program = cp.MLModelStructureProgram(functions={"main": fn})
            self.n = sum(op.operator_name != "const" for op in ops)
        else:
            layers = [cp.MLModelStructureNeuralNetworkLayer(name=l.name, type=l.WhichOneof("layer"), input_names=[],
                                                            output_names=[], __proxy__=None)
                      for l in spec.neuralNetwork.layers]
            self.nn = cp.MLModelStructureNeuralNetwork(layers=layers)
            self.n = len(layers)

    @property
    def model_structure(self):
        return cp.MLModelStructure(neuralnetwork=self.nn, program=self.program, pipeline=None)

    def _usage(self, kind):
        if kind == "const":
            return None
        preferred = _device(cd.MLCPUComputeDevice if kind in OFF_NE else cd.MLNeuralEngineComputeDevice)
        return cp.MLComputePlanDeviceUsage(preferred_compute_device=preferred,
                                           supported_compute_devices=[_device(cd.MLCPUComputeDevice), preferred])

    def get_compute_device_usage_for_mlprogram_operation(self, op):
        return self._usage(op.operator_name)

    def get_compute_device_usage_for_neuralnetwork_layer(self, layer):
        return self._usage(layer.type)

    def get_estimated_cost_for_mlprogram_operation(self, op):
        return None if op.operator_name == "const" else cp.MLComputePlanCost(weight=1.0 / self.n)


@pytest.fixture(params=["stand-in", pytest.param("core ml", marks=pytest.mark.skipif(
    not ON_MAC, reason="Core ML itself runs on macOS only"))])
def device(request, monkeypatch):
    if request.param == "stand-in":
        monkeypatch.setattr(cr, "coreml_available", lambda: True)
        monkeypatch.setattr(ct.models, "MLModel", StandInModel)
        monkeypatch.setattr(cp.MLComputePlan, "load_from_path",
                            classmethod(lambda cls, path, compute_units=None: StandInPlan(path)))
    return request.param



@pytest.mark.parametrize("name", ["mlprogram/image/fp16", "neuralnetwork/image/fp32"])
def test_compute_plan_names_each_op_its_device_and_the_ops_off_the_neural_engine(tb_zoo, device, name):
    path = tb_zoo.path(name)
    r = run("info", path, "--compute-plan", "--json")
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)["compute_plan"]
    assert plan["ops"] and all(o["preferred"] in ("CPU", "GPU", "Neural Engine") for o in plan["ops"])
    if device == "stand-in":
        norms = [o["name"] for o in plan["ops"] if o["op"] in OFF_NE]
        assert norms, "the small TinyBeauty has norms"
        assert plan["off_neural_engine"] == norms
        assert plan["by_device"]["CPU"]["ops"] == len(norms)
        assert not any(o["op"] == "const" for o in plan["ops"])  # constants carry no work
        if name.startswith("mlprogram"):
            assert sum(o["cost"] for o in plan["ops"]) == pytest.approx(1.0, abs=1e-2)
            assert plan["by_device"]["CPU"]["cost"] == pytest.approx(len(norms) / len(plan["ops"]), abs=1e-2)
        assert plan["summary"].startswith(f"{len(norms)} of {len(plan['ops'])} ops leave the Neural Engine: ")
        assert norms[0] in plan["summary"]
    human = run("info", path, "--compute-plan")
    assert human.exit_code == 0
    assert "compute plan (all): where Core ML runs each op" in human.stdout
    assert "compute plan: " in human.stdout


def test_compute_plan_off_macos_is_one_line_and_exit_1(tb_zoo, monkeypatch):
    monkeypatch.setattr(cr, "coreml_available", lambda: False)
    r = run("info", tb_zoo.path("mlprogram/image/fp16"), "--compute-plan")
    assert_one_line_error(r, "--compute-plan needs Core ML itself: macOS 14.4 or later", code=1)


def test_compute_plan_of_a_pytorch_file_is_a_usage_error(small_artifact):
    assert_one_line_error(run("info", small_artifact, "--compute-plan"), "takes a Core ML file", code=2)
