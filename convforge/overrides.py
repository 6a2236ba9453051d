"""What a user says about a model file made elsewhere, which the file does not say itself.

    overrides = ModelOverrides(mean=(0.5, 0.5, 0.5), classes=("cat", "dog"))
    info = read_info("m.onnx", overrides)  # read as if its metadata held these
    model = load("m.onnx", overrides=overrides)  # every reader of the file sees them

The fields generate the ``--mean --std --resize --labels --output --layout``
options of ``predict``, ``bench``, ``serve``, ``tune`` and ``annotate``
(:func:`convforge.cli.arguments.add_model_overrides`); ``convforge annotate`` writes
the same values into a copy of the file. Each is a metadata key of the file
contract (:data:`convforge.contract.KEYS`) and wins over the file's own value;
None keeps the file's, else the default. Values are checked against the graph
when the file is read (a mean of the wrong length, a resize below the input size).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from convforge.contract import LAYOUTS
from convforge.settings import setting


@dataclass(frozen=True)
class ModelOverrides:
    """Metadata given for a model file, by contract key; None: the file's, else the default."""

    mean: tuple[float, ...] | None = setting(None, "per-channel mean of [0, 1] pixels "
                                             "(default: the file's, else ImageNet's "
                                             "0.485,0.456,0.406)")  # fmt: skip
    std: tuple[float, ...] | None = setting(None, "per-channel std (default: the file's, "
                                            "else ImageNet's 0.229,0.224,0.225)")  # fmt: skip
    resize_size: int | None = setting(None, "resize the shorter side to this, then centre-crop "
                                      "the input size (default: the file's, else input / "
                                      "0.875)", flag="--resize", minimum=1)  # fmt: skip
    classes: tuple[str, ...] | None = setting(None, "text file: one class name per line, in "
                                              "logit order", flag="--labels")  # fmt: skip
    output: str | None = setting(None, "the graph output with the class scores (default: "
                                 "'logits' if present, else the first)")  # fmt: skip
    layout: str | None = setting(None, "the input's layout (default: the file's, else "
                                 "inferred from its shape)", choices=LAYOUTS)  # fmt: skip

    def metadata(self) -> dict:
        """The values given (None left out), as the file's decoded metadata holds them:
        ``{"mean": [0.5, 0.5, 0.5], "classes": ["cat", "dog"]}``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()
                if v is not None}  # fmt: skip
