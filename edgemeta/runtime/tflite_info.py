"""Read a .tflite file's structure without an interpreter: operators with their versions,
tensors with types and quantisation, size. Uses the `tflite` flatbuffer bindings (pure Python),
so it runs on a board and on the host alike, before a model is ever loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgemeta.errors import EdgemetaError
from edgemeta.files import read_regular

TFLITE_MAGIC = b"TFL3"
MAX_MODEL_BYTES = 2**31  # the flatbuffer format's own limit


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int]
    scale: float | None = None
    zero_point: int | None = None


@dataclass
class ModelStructure:
    size: int
    ops: dict[str, int]                   # op name -> highest version used
    op_counts: dict[str, int]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    tensor_types: dict[str, int] = field(default_factory=dict)  # dtype -> number of tensors
    op_sequence: list[str] = field(default_factory=list)        # ops in execution order
    dynamic_tensors: int = 0                                      # tensors with an unknown (-1) dimension

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _names(module) -> dict[int, str]:
    return {v: k for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, int)}


def read_structure(path: str | Path, data: bytes | None = None) -> ModelStructure:
    """Parse a .tflite flatbuffer; a clear error when it is not one (truncated, corrupt, other file)."""
    import tflite

    if data is None:
        try:
            data = read_regular(path, MAX_MODEL_BYTES, "model file")  # not /dev/zero, not a FIFO
        except OSError as e:
            raise EdgemetaError(f"cannot read {path}: {e.strerror}") from None
    if len(data) < 8 or data[4:8] != TFLITE_MAGIC:
        raise EdgemetaError(f"{path} is not a TFLite model (no TFL3 identifier); re-export it")
    op_names, type_names = _names(tflite.BuiltinOperator), _names(tflite.TensorType)
    try:
        model = tflite.Model.GetRootAsModel(data, 0)
        codes = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            # builtin codes above 127 live in BuiltinCode(); older files only fill the deprecated byte
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            name = op_names.get(code, f"BUILTIN_{code}")
            if name == "CUSTOM":
                name = f"CUSTOM:{oc.CustomCode().decode()}"
            codes.append((name, oc.Version()))
        ops: dict[str, int] = {}
        counts: dict[str, int] = {}
        sequence = []
        graph = model.Subgraphs(0)
        for i in range(graph.OperatorsLength()):
            name, version = codes[graph.Operators(i).OpcodeIndex()]
            ops[name] = max(ops.get(name, 0), version)
            counts[name] = counts.get(name, 0) + 1
            sequence.append(name)

        def tensor(ix: int) -> TensorInfo:
            t = graph.Tensors(ix)
            q = t.Quantization()
            scale = zp = None
            if q is not None and q.ScaleLength() == 1:
                scale, zp = float(q.Scale(0)), int(q.ZeroPoint(0))
            shape = [int(s) for s in (t.ShapeSignatureAsNumpy() if t.ShapeSignatureLength() else t.ShapeAsNumpy())]
            return TensorInfo(t.Name().decode(), type_names.get(t.Type(), str(t.Type())).lower(), shape, scale, zp)

        types: dict[str, int] = {}
        dynamic = 0
        for i in range(graph.TensorsLength()):
            t = graph.Tensors(i)
            tname = type_names.get(t.Type(), "?").lower()
            types[tname] = types.get(tname, 0) + 1
            dynamic += bool(t.ShapeSignatureLength() and (t.ShapeSignatureAsNumpy() < 0).any())
        inputs = [tensor(graph.Inputs(i)) for i in range(graph.InputsLength())]
        outputs = [tensor(graph.Outputs(i)) for i in range(graph.OutputsLength())]
    except EdgemetaError:
        raise
    except Exception as e:  # flatbuffers raises IndexError/struct.error etc. on damaged data
        raise EdgemetaError(f"{path} is damaged or truncated ({type(e).__name__}); re-export or copy it again") from None
    return ModelStructure(len(data), dict(sorted(ops.items())), dict(sorted(counts.items())), inputs, outputs, types,
                          sequence, dynamic)
