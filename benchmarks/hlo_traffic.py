"""Bytes moved and kernels launched by one call of a compiled program, summed from its optimized HLO.

For backends whose ``cost_analysis()`` gives nothing (XLA:GPU compiled deviceless) and as a
cross-check elsewhere. The rules, applied to the text of ``compiled.as_text()``:

- Executed computations: ENTRY, and recursively the bodies/conditions of ``while`` (times the
  ``known_trip_count`` XLA records in the loop's backend_config; 1 when unknown, reported in
  ``unknown_loops``), the branches of ``conditional`` (the costliest branch: an upper bound) and the
  targets of ``call``. Fused computations are never walked as executed code.
- Every other instruction of an executed computation is one kernel launch, except the ones that move
  no data: ``parameter``, ``constant``, ``get-tuple-element``, ``tuple``, ``bitcast``,
  ``after-all``, ``partition-id``, ``replica-id``, ``opt-barrier``, ``add-dependency``.
- Its bytes: what each operand is read plus what the output is written, where
  - an operand that (inside a fusion: whose fusion parameter) is only sliced (``slice``,
    ``dynamic-slice``, ``gather``; through bitcasts) is charged the slices' bytes, not its size;
  - an operand that is only the buffer a ``dynamic-update-slice`` / ``scatter`` updates is charged
    nothing, and that output is charged the update's bytes (XLA emits these in place; where it cannot,
    it inserts a ``copy`` beforehand, which is charged like any other kernel);
  - a ``custom-call`` whose backend_config declares ``bytes_accessed`` (Pallas kernels with a cost
    estimate) is charged that; other custom calls their operands and outputs, less the trailing
    ``s8``/``u8`` workspace of cuBLAS/cuDNN calls;
  - an asynchronous copy is one transfer: ``copy-start`` is charged its source (the operand) and its
    destination (element 0 of its (destination, source, context) tuple), ``copy-done`` (the wait) nothing.

``memory_space=0`` counts only arrays in memory space 0 (no ``S(k)`` with k != 0 in their layout):
HBM on TPU. XLA:TPU's memory-space assignment prefetches operands into ``S(1)`` with
``copy-start``/``copy-done`` and lets fusions read (and write) ``S(1)`` buffers; on TPU the memory space
colors are those of ``jax._src.tpu_custom_call.MemorySpace``: 0 HBM, 1 VMEM (on-chip), 2 semaphores
(the copies' context ``u32[]{:S(2)}``), 4 SMEM, 5 host. So with ``memory_space=0`` a prefetched weight is
charged once, as the HBM read of its ``copy-start``, not again where a fusion reads the VMEM copy (which
``cost_analysis()`` adds on top), and VMEM-resident intermediates are not charged at all.
"""
from __future__ import annotations

import contextvars
import dataclasses
import math
import re

_DTYPE_BITS = {"pred": 8, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32, "s64": 64, "u64": 64,
               "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128, "s4": 4, "u4": 4, "s2": 2,
               "u2": 2, "s1": 1, "u1": 1, "f4e2m1fn": 4, "f8e8m0fnu": 8, "f8e4m3fn": 8, "f8e5m2": 8,
               "f8e4m3": 8, "f8e3m4": 8, "f8e4m3b11fnuz": 8, "f8e4m3fnuz": 8, "f8e5m2fnuz": 8, "token": 0}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BITS, key=len, reverse=True)) + r")\[([\d,]*)\](\{[^}]*\})?")
_SPACE = re.compile(r"S\((\d+)\)")
#: Only arrays in this memory space are charged (None: all); set by :func:`traffic`.
_ONLY_SPACE: contextvars.ContextVar[int | None] = contextvars.ContextVar("hlo_traffic_space", default=None)
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INST = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "add-dependency", "domain"}
_CONTROL = {"while", "conditional", "call"}
_SLICES = {"slice", "dynamic-slice", "gather"}
_UPDATES = {"dynamic-update-slice", "scatter"}


def shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string (tuples summed)."""
    return sum(_array_bytes(m) for m in _ARRAY.finditer(shape))


def _array_bytes(m: re.Match) -> int:
    only = _ONLY_SPACE.get()
    if only is not None:
        space = _SPACE.search(m.group(3) or "")
        if (int(space.group(1)) if space else 0) != only:
            return 0
    dims = [int(d) for d in m.group(2).split(",") if d]
    return math.prod(dims) * _DTYPE_BITS[m.group(1)] // 8


@dataclasses.dataclass
class Inst:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool

    @property
    def bytes(self) -> int:
        return shape_bytes(self.shape)


@dataclasses.dataclass
class Computation:
    name: str
    entry: bool
    insts: dict[str, Inst]
    root: Inst | None = None

    def users(self, name: str) -> list[Inst]:
        return [i for i in self.insts.values() if name in i.operands]



def _balanced(s: str, start: int) -> int:
    """Index just past the bracket group opening at ``s[start]``."""
    depth, i, pairs = 0, start, {"(": ")", "{": "}", "[": "]"}
    closers = set(pairs.values())
    while i < len(s):
        c = s[i]
        if c in pairs:
            depth += 1
        elif c in closers:
            depth -= 1
            if depth == 0:
                return i + 1
        elif c == '"':
            i = s.index('"', i + 1)
        i += 1
    return len(s)


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, []
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if cur:
        out.append("".join(cur))
    return out


def _parse_inst(line: str) -> Inst | None:
    m = _INST.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    om = re.match(r"([\w\-]+)\(", rest)
    if not om:
        return None
    opcode = om.group(1)
    close = _balanced(rest, om.end() - 1)
    args = rest[om.end():close - 1]
    operands = [re.findall(r"%([\w.\-]+)", a)[-1] for a in _split_top(args) if "%" in a]
    inst = Inst(m.group(2), shape, opcode, operands, rest[close:], bool(m.group(1)))
    inst.attrs_args = args  # type: ignore[attr-defined] - the parameter number of a parameter
    return inst


def parse(text: str) -> dict[str, Computation]:
    """Optimized HLO module text -> {computation name: Computation}."""
    comps: dict[str, Computation] = {}
    cur = None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            cur = comps[h.group(2)] = Computation(h.group(2), bool(h.group(1)), {})
            continue
        if cur is None:
            continue
        if line.strip() == "}":
            cur = None
            continue
        inst = _parse_inst(line)
        if inst is not None:
            cur.insts[inst.name] = inst
            if inst.root:
                cur.root = inst
    return comps


def _attr(attrs: str, key: str) -> list[str]:
    """Computation names given by attribute ``key`` (``calls=%a`` or ``key={%a, %b}``)."""
    m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%[\w.\-]+)", attrs)
    return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def _through_bitcasts(comp: Computation, name: str) -> list[tuple[Inst, str]]:
    """(user, the operand name it uses) for the users of ``name``, looking through bitcasts."""
    out = []
    for u in comp.users(name):
        if u.opcode == "bitcast":
            out += _through_bitcasts(comp, u.name)
        else:
            out.append((u, name))
    return out


def _read_bytes(comp: Computation, name: str, full: int) -> int:
    """Bytes of value ``name`` (``full`` bytes) that its users in ``comp`` read."""
    total = 0
    for user, used in _through_bitcasts(comp, name):
        first = user.operands and user.operands[0] == used
        if first and user.opcode in _SLICES:
            total += user.bytes
        elif first and user.opcode in _UPDATES and used not in user.operands[1:]:
            continue  # the buffer updated in place
        else:
            return full
    return min(total, full)


def _write_bytes(comp: Computation, inst: Inst) -> int:
    """Bytes the value of ``inst`` really writes (in-place updates: the update)."""
    while inst.opcode == "bitcast" and inst.operands[0] in comp.insts:
        inst = comp.insts[inst.operands[0]]
    if inst.opcode == "tuple":
        return sum(_write_bytes(comp, comp.insts[o]) if o in comp.insts else 0 for o in inst.operands)
    if inst.opcode == "dynamic-update-slice":
        return _value_bytes(comp, inst.operands[1])
    if inst.opcode == "scatter":
        return _value_bytes(comp, inst.operands[-1])
    return inst.bytes


def _value_bytes(comp: Computation, name: str) -> int:
    return comp.insts[name].bytes if name in comp.insts else 0


@dataclasses.dataclass
class Traffic:
    """Totals for one call: bytes read + written by kernels, kernel launches, loops without a known
    trip count (charged once) and the bytes of the largest kernels (name -> bytes, per call)."""

    bytes: int = 0
    kernels: int = 0
    unknown_loops: int = 0
    by_kernel: dict = dataclasses.field(default_factory=dict)

    def add(self, other: "Traffic", times: int = 1) -> None:
        self.bytes += other.bytes * times
        self.kernels += other.kernels * times
        self.unknown_loops += other.unknown_loops * times
        for k, v in other.by_kernel.items():
            self.by_kernel[k] = self.by_kernel.get(k, 0) + v * times


def _kernel_bytes(comps: dict[str, Computation], comp: Computation, inst: Inst) -> int:
    if inst.opcode == "copy-start":  # source + destination (element 0 of the tuple)
        dest = next(_ARRAY.finditer(inst.shape), None)
        return sum(_value_bytes(comp, o) for o in inst.operands[:1]) + (_array_bytes(dest) if dest else 0)
    if inst.opcode == "custom-call":
        declared = re.search(r'bytes_accessed\\?"?\s*[:=]\s*\\?"?(\d+)', inst.attrs)
        if declared:
            return int(declared.group(1))
        out = [_array_bytes(m) for m in _ARRAY.finditer(inst.shape)]
        target = re.search(r'custom_call_target="([^"]*)"', inst.attrs)
        if inst.shape.startswith("(") and target and target.group(1).startswith(("__cublas", "__cudnn")) \
                and re.search(r"[su]8\[\d+\]\{?[\d]*\}?\)$", inst.shape):
            out = out[:-1]  # workspace
        return sum(_value_bytes(comp, o) for o in inst.operands) + sum(out)
    if inst.opcode == "fusion":
        (called,) = _attr(inst.attrs, "calls")
        fc = comps[called]
        params = {int(re.match(r"\s*(\d+)", p.attrs_args).group(1)): p for p in fc.insts.values()
                  if p.opcode == "parameter"}
        reads = sum(_read_bytes(fc, params[i].name, _value_bytes(comp, o)) for i, o in enumerate(inst.operands))
        return reads + _write_bytes(fc, fc.root)
    # a lone op: the same rules as a one-instruction fusion
    reads = 0
    for i, o in enumerate(inst.operands):
        full = _value_bytes(comp, o)
        if i == 0 and inst.opcode in _SLICES:
            reads += min(full, inst.bytes)
        elif i == 0 and inst.opcode in _UPDATES:
            continue
        else:
            reads += full
    return reads + _write_bytes(comp, inst)


def _walk(comps: dict[str, Computation], comp: Computation) -> Traffic:
    t = Traffic()
    for inst in comp.insts.values():
        if inst.opcode in _FREE or inst.opcode == "copy-done":  # the wait of a copy-start: no transfer of its own
            continue
        if inst.opcode == "while":
            trip = re.search(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', inst.attrs)
            n = int(trip.group(1)) if trip else 1
            for name in _attr(inst.attrs, "body") + _attr(inst.attrs, "condition"):
                t.add(_walk(comps, comps[name]), n)
            t.unknown_loops += trip is None
        elif inst.opcode == "conditional":
            names = _attr(inst.attrs, "branch_computations") or \
                _attr(inst.attrs, "true_computation") + _attr(inst.attrs, "false_computation")
            branches = [_walk(comps, comps[n]) for n in names]
            t.add(max(branches, key=lambda b: b.bytes))
        elif inst.opcode == "call":
            for name in _attr(inst.attrs, "to_apply"):
                t.add(_walk(comps, comps[name]))
        else:
            b = _kernel_bytes(comps, comp, inst)
            t.bytes += b
            t.kernels += 1
            t.by_kernel[inst.name] = t.by_kernel.get(inst.name, 0) + b
    return t


def traffic(hlo_text: str, memory_space: int | None = None) -> Traffic:
    """Bytes moved and kernels launched by one call of the module (rules in the module docstring);
    ``memory_space``: charge only arrays in that memory space (0: HBM on TPU), None: all."""
    comps = parse(hlo_text)
    entry = [c for c in comps.values() if c.entry]
    if len(entry) != 1:
        raise ValueError(f"expected one ENTRY computation in the HLO text, found {len(entry)}")
    token = _ONLY_SPACE.set(memory_space)
    try:
        return _walk(comps, entry[0])
    finally:
        _ONLY_SPACE.reset(token)
