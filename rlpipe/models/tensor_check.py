"""The check shared by the checkpoint readers: the file's tensors against the model's.

Both readers (``hf.py``: safetensors, ``gguf.py``: GGUF) compare the tensor
names and shapes a file holds with those the model needs before reading any
data, and report every difference at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping


def check_tensors(found: Mapping[str, tuple[int, ...]], wanted: Mapping[str, tuple[int, ...]], *,
                  ignore: Callable[[str], bool], header: str, error: type[Exception], shape_note: str = "") -> None:
    """Raises ``error`` listing the missing, unexpected and mismatched tensors, if any.

    Args:
        found: the file's tensors: name -> shape.
        wanted: the model's: name -> shape, in the file's naming and layout.
        ignore: names the file may hold that the model does not need.
        header: the message's first line (which file, what it should match).
        error: the exception type; built as ``error(message, missing=,
            unexpected=, mismatched=)``.
        shape_note: appended to each shape mismatch (the layout the shapes are in).
    """
    missing = [n for n in wanted if n not in found]
    unexpected = sorted(n for n in found if n not in wanted and not ignore(n))
    mismatched = [(n, wanted[n], tuple(found[n])) for n in wanted if n in found and tuple(found[n]) != tuple(wanted[n])]
    if not (missing or unexpected or mismatched):
        return
    lines = [header]
    if missing:
        lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
    for n, want, got in mismatched:
        lines.append(f"  tensor {n} has shape {list(got)}, expected {list(want)}{shape_note}")
    raise error("\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched)
