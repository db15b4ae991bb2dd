"""Matmul FLOPs of a compiled program, counted from its optimized HLO text.

Why: XLA's own count (`compiled.cost_analysis()['flops']`, on CPU and TPU alike) counts
a `while` loop's body once, whatever its trip count. A layer stack run as a `lax.scan`,
gradient accumulation over micro-batches in a scan, or remat inside a scan is therefore
undercounted by the trip count, and hardware FLOPs utilisation (HFU) computed from it
is too low by the same factor. `matmul_flops` counts what the program really executes:

  * every `dot`: 2 x elements(result) x product of the lhs contracting dims;
  * every `convolution` (TPU emits most matmuls as one, `dim_labels=bf_io->bf`):
    2 x elements(result) x (lhs feature size / feature_group_count) x the kernel taps
    that land on real input, per output position (the window's size, less the taps on
    padding or on lhs-dilation holes: XLA's own convention, so a program without loops
    gets XLA's count);

each computation's count multiplied by how many times it runs: from the ENTRY
computation through fusions (`calls=`), `call`s (`to_apply=`), async wrappers,
`while` bodies (times the trip count, nested loops multiplying) and `conditional`s
(the costliest branch). Only matmuls and convolutions count: elementwise work,
reductions and collectives are a few percent of a matmul-dominated step.

A loop's trip count is XLA's `known_trip_count` when the backend printed it (CPU and
GPU usually do), else it is read from the loop itself: the condition compares an
induction variable (a tuple element of the loop state) `LT` a constant, the init tuple
starts it at a constant and the body adds a constant step to it (what `lax.scan` and
`fori_loop` with static bounds compile to). When a trip count cannot be found (a
`lax.while_loop` with a data-dependent bound), `matmul_flops` returns None and the
caller falls back to cost_analysis and says so. Matmuls that a backend emits as custom
calls (cuBLAS/cuDNN on GPU, oneDNN) are not `dot`s: cuBLAS gemms are counted from their
`dot_dimension_numbers`, other matmul-like custom calls make the count None.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

# A computation's header: `%name (p0: f32[2], ...) -> f32[2] {`, `ENTRY %name ...`. Its
# parameters' shapes are read from their `parameter(n)` instructions, which print them.
_HEADER = re.compile(r"^(ENTRY\s+)?%?(?P<name>[^\s(]+)\s*\((?P<params>.*)\)\s*->\s*.*\{\s*$")
# An instruction: `[ROOT ]%name = <shape> <opcode>(<operands>)<attributes>`.
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<rest>.*)$")
_ARRAY = re.compile(r"(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[^\]]*)\]")
_METADATA = re.compile(r',?\s*metadata=\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\}')
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')
_GEMM_TARGETS = ("gemm", "matmul", "cublas", "cudnn", "$conv")


@dataclass
class _Instr:
  name: str
  shape: object  # tuple(dims) for an array, list of shapes for a tuple
  opcode: str
  operands: list[str]
  attrs: str  # everything after the operand list, metadata stripped
  literal: str = ""  # a constant's printed value


@dataclass
class _Comp:
  name: str
  instrs: dict[str, _Instr] = field(default_factory=dict)
  root: str = ""


def _skip_braces(text: str, i: int) -> int:
  """Index after the balanced `{...}` starting at text[i] (a layout), else i."""
  if i >= len(text) or text[i] != "{":
    return i
  depth = 0
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return j + 1
  return len(text)


def _parse_shape(text: str, i: int = 0) -> tuple[object, int]:
  """The shape printed at text[i:] (layouts such as `{1,0:T(8,128)(2,1)S(1)}` skipped)
  and the index after it: a tuple of dims for an array, a list of shapes for a tuple."""
  while i < len(text) and text[i] == " ":
    i += 1
  if text.startswith("(", i):
    shapes, i = [], i + 1
    while i < len(text) and text[i] != ")":
      if text.startswith("/*", i):  # `/*index=5*/`
        i = text.index("*/", i) + 2
      elif text[i] in ", ":
        i += 1
      else:
        shape, i = _parse_shape(text, i)
        shapes.append(shape)
    return shapes, i + 1
  m = _ARRAY.match(text, i)
  if not m:
    raise ValueError(f"no shape at {text[i:i + 40]!r}")
  dims = tuple(int(d.strip().lstrip("<=")) for d in m.group("dims").split(",") if d.strip())
  return dims, _skip_braces(text, m.end())


def _split_top(text: str) -> list[str]:
  """`text` split at the commas outside brackets."""
  parts, depth, start = [], 0, 0
  for j, ch in enumerate(text):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(text[start:j])
      start = j + 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


def _parse_instr(line: str) -> _Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  rest = _METADATA.sub("", m.group("rest"))
  shape, i = _parse_shape(rest)
  op = re.compile(r"\s*([\w-]+)\(").match(rest, i)
  if not op:
    return None
  j, depth = op.end(), 1
  while j < len(rest) and depth:
    depth += {"(": 1, ")": -1}.get(rest[j], 0)
    j += 1
  args = rest[op.end():j - 1]
  opcode = op.group(1)
  operands = [] if opcode == "constant" else [a.split()[-1].lstrip("%") for a in _split_top(args)]
  return _Instr(m.group("name"), shape, opcode, operands, rest[j:], literal=args.strip())


def _parse_module(hlo_text: str) -> tuple[dict[str, _Comp], str]:
  """The module's computations by name, and the ENTRY computation's name."""
  comps: dict[str, _Comp] = {}
  entry, comp = "", None
  for line in hlo_text.splitlines():
    if comp is None:
      m = _HEADER.match(line)
      if m:
        comp = comps.setdefault(m.group("name"), _Comp(m.group("name")))
        entry = m.group("name") if m.group(1) else entry
      continue
    if line.strip() == "}":
      comp = None
      continue
    instr = _parse_instr(line)
    if instr is None:
      continue
    comp.instrs[instr.name] = instr
    if line.lstrip().startswith("ROOT"):
      comp.root = instr.name
  return comps, entry


def _elements(shape: object) -> int:
  if isinstance(shape, list):
    raise ValueError("a tuple-shaped matmul result")
  return math.prod(shape)


def _attr(attrs: str, key: str) -> str | None:
  m = re.search(rf"(?:^|[\s,]){key}=(\{{[^}}]*\}}|[^\s,]+)", attrs)
  return m.group(1) if m else None


def _dims(value: str | None) -> list[int]:
  return [int(d) for d in re.findall(r"\d+", value or "")]


def _dot_flops(comp: _Comp, instr: _Instr, contracting: list[int] | None = None,
               result: object = None) -> int:
  lhs = comp.instrs[instr.operands[0]].shape
  if contracting is None:
    contracting = _dims(_attr(instr.attrs, "lhs_contracting_dims"))
  result = instr.shape if result is None else result
  return 2 * _elements(result) * math.prod(lhs[d] for d in contracting)


def _window(attrs: str) -> dict[str, list]:
  """`window={size=3x3 stride=2x1 pad=1_1x0_0 lhs_dilate=1x1 rhs_dilate=1x1}` as lists."""
  window = _attr(attrs, "window")
  out: dict[str, list] = {}
  for item in (window or "").strip("{}").split():
    key, _, value = item.partition("=")
    if key == "pad":
      out[key] = [tuple(int(p) for p in v.split("_")) for v in value.split("x")]
    elif key in ("size", "stride", "lhs_dilate", "rhs_dilate"):
      out[key] = [int(v) for v in value.split("x")]
  return out


def _valid_taps(in_size: int, out_size: int, size: int, stride: int, pad_lo: int,
                lhs_dilate: int, rhs_dilate: int) -> int:
  """(output position, kernel position) pairs of one spatial dim that read real input."""
  last = (in_size - 1) * lhs_dilate
  count = 0
  for o in range(out_size):
    for k in range(size):
      pos = o * stride + k * rhs_dilate - pad_lo
      count += 0 <= pos <= last and pos % lhs_dilate == 0
  return count


def _conv_flops(comp: _Comp, instr: _Instr, result: object = None) -> int:
  result = instr.shape if result is None else result
  lhs = comp.instrs[instr.operands[0]].shape
  labels = _attr(instr.attrs, "dim_labels")
  if not labels:
    raise ValueError(f"convolution {instr.name} without dim_labels")
  lhs_labels, _, out_labels = labels.partition("->")
  lhs_labels = lhs_labels.split("_")[0]
  groups = int(_attr(instr.attrs, "feature_group_count") or 1)
  spatial = sorted(ch for ch in lhs_labels if ch.isdigit())
  window = _window(instr.attrs)
  taps, out_positions = 1, 1
  for n, ch in enumerate(spatial):
    in_size, out_size = lhs[lhs_labels.index(ch)], result[out_labels.index(ch)]
    size = window.get("size", [1] * len(spatial))[n]
    taps *= _valid_taps(in_size, out_size, size, window.get("stride", [1] * len(spatial))[n],
                        window.get("pad", [(0, 0)] * len(spatial))[n][0],
                        window.get("lhs_dilate", [1] * len(spatial))[n],
                        window.get("rhs_dilate", [1] * len(spatial))[n])
    out_positions *= out_size
  feature = lhs[lhs_labels.index("f")] // groups
  return 2 * (_elements(result) // max(out_positions, 1)) * feature * taps


def _custom_call_flops(comp: _Comp, instr: _Instr) -> int | None:
  """A cuBLAS gemm's FLOPs; None for another matmul-like custom call; 0 for the rest."""
  target = (_attr(instr.attrs, "custom_call_target") or "").strip('"').lower()
  if not any(t in target for t in _GEMM_TARGETS):
    return 0
  start = instr.attrs.find("backend_config=")
  result = instr.shape[0] if isinstance(instr.shape, list) else instr.shape
  if "gemm" in target and start >= 0:
    try:
      config, _ = json.JSONDecoder().raw_decode(instr.attrs, start + len("backend_config="))
      numbers = config["gemm_backend_config"]["dot_dimension_numbers"]
      contracting = [int(d) for d in numbers["lhs_contracting_dimensions"]]
    except (ValueError, KeyError, TypeError):
      return None
    return _dot_flops(comp, instr, contracting, result)
  return None


# --- trip counts ------------------------------------------------------------------------

def _value(comps: dict[str, _Comp], comp: _Comp, name: str, args: dict | None = None,
           depth: int = 0) -> tuple | None:
  """A scalar instruction as a small expression over the loop state: ("const", v),
  ("gte", i) (element i of parameter 0), ("add", a, b), ("cmp", direction, a, b);
  copies and converts are looked through, fusions are entered. None if it is none of
  these. `args` maps a fused computation's parameter numbers to the fusion's operands."""
  instr = comp.instrs.get(name)
  if instr is None or depth > 32:
    return None
  op = instr.opcode
  if op == "parameter":
    number = int(instr.literal)
    return args.get(number) if args is not None else None
  if op == "constant":
    try:
      return ("const", int(instr.literal))
    except ValueError:
      return None
  if op in ("copy", "convert", "bitcast", "reshape"):
    return _value(comps, comp, instr.operands[0], args, depth + 1)
  if op == "get-tuple-element":
    source = comp.instrs.get(instr.operands[0])
    if args is None and source is not None and source.opcode == "parameter" \
        and int(source.literal) == 0:
      return ("gte", int(_attr(instr.attrs, "index")))
    return None
  if op in ("add", "compare"):
    a, b = (_value(comps, comp, o, args, depth + 1) for o in instr.operands[:2])
    if a is None or b is None:
      return None
    return ("add", a, b) if op == "add" else ("cmp", _attr(instr.attrs, "direction"), a, b)
  if op == "fusion":
    fused = comps.get(_attr(instr.attrs, "calls").lstrip("%"))
    if fused is None:
      return None
    fused_args = {n: _value(comps, comp, o, args, depth + 1)
                  for n, o in enumerate(instr.operands)}
    return _value(comps, fused, fused.root, fused_args, depth + 1)
  return None


def _trip_count(comps: dict[str, _Comp], caller: _Comp, loop: _Instr) -> int | None:
  """How many times `loop` (a while in `caller`) runs its body (module doc); None when
  that cannot be read from the text."""
  known = _TRIP.search(loop.attrs)
  if known:
    return int(known.group(1))
  cond = comps.get((_attr(loop.attrs, "condition") or "").lstrip("%"))
  body = comps.get((_attr(loop.attrs, "body") or "").lstrip("%"))
  init = caller.instrs.get(loop.operands[0])
  if cond is None or body is None or init is None or init.opcode != "tuple":
    return None
  test = _value(comps, cond, cond.root)
  if test is None or test[0] != "cmp":
    return None
  _, direction, a, b = test
  if direction == "GT":
    direction, a, b = "LT", b, a
  state = body.instrs.get(body.root)
  if direction != "LT" or a[0] != "gte" or state is None or state.opcode != "tuple":
    return None
  index = a[1]

  def initial(i: int) -> int | None:
    v = _value(comps, caller, init.operands[i]) if i < len(init.operands) else None
    return v[1] if v is not None and v[0] == "const" else None

  def invariant(v: tuple) -> int | None:
    """A constant, or a state element the body passes through unchanged (its init)."""
    if v[0] == "const":
      return v[1]
    if v[0] == "gte" and v[1] < len(state.operands) \
        and _value(comps, body, state.operands[v[1]]) == v:
      return initial(v[1])
    return None

  update = _value(comps, body, state.operands[index]) if index < len(state.operands) else None
  if update is None or update[0] != "add":
    return None
  step = None
  if update[1] == a:
    step = invariant(update[2])
  elif update[2] == a:
    step = invariant(update[1])
  bound, start = invariant(b), initial(index)
  if step is None or bound is None or start is None or step <= 0:
    return None
  return max(0, -(-(bound - start) // step))


# --- the walk ---------------------------------------------------------------------------

def _comp_flops(comps: dict[str, _Comp], name: str, memo: dict[str, float | None]) -> float | None:
  if name in memo:
    return memo[name]
  memo[name] = None  # a cycle (never in valid HLO) reads as unknown
  comp = comps.get(name)
  if comp is None:
    return None
  total = 0.0
  for instr in comp.instrs.values():
    op, attrs = instr.opcode, instr.attrs
    callees: list[tuple[str, float]] = []
    if op == "dot":
      total += _dot_flops(comp, instr)
    elif op == "convolution":
      total += _conv_flops(comp, instr)
    elif op == "custom-call":
      flops = _custom_call_flops(comp, instr)
      if flops is None:
        return None
      total += flops
    if op == "while":
      trips = _trip_count(comps, comp, instr)
      if trips is None:
        return None
      callees.append((_attr(attrs, "body"), trips))
    elif op == "conditional":
      branches = _attr(attrs, "branch_computations")
      names = re.findall(r"%?([^\s{},%]+)", branches) if branches else [
          _attr(attrs, "true_computation"), _attr(attrs, "false_computation")]
      counts = [_comp_flops(comps, n.lstrip("%"), memo) for n in names if n]
      if any(c is None for c in counts):
        return None
      total += max(counts, default=0.0)
    elif op == "call":
      callees.append((_attr(attrs, "to_apply"), 1))
    elif op not in ("async-update", "async-done"):  # async-start holds the work
      if _attr(attrs, "calls"):
        callees.append((_attr(attrs, "calls"), 1))
      if op != "custom-call" and _attr(attrs, "called_computations"):
        callees += [(n, 1) for n in re.findall(r"%?([^\s{},%]+)",
                                               _attr(attrs, "called_computations"))]
    for callee, times in callees:
      if callee is None:
        return None
      flops = _comp_flops(comps, callee.lstrip("%"), memo)
      if flops is None:
        return None
      total += times * flops
  memo[name] = total
  return total


def matmul_flops(hlo_text: str) -> float | None:
  """FLOPs of every dot and convolution one device's program executes (module doc),
  loops counted by their trip counts; None when a loop's trip count is unknown or the
  text holds something this parser cannot count."""
  try:
    comps, entry = _parse_module(hlo_text)
    if not entry:
      return None
    return _comp_flops(comps, entry, {})
  except (ValueError, KeyError, IndexError, TypeError, AttributeError):
    return None
