"""Just enough PromQL to evaluate a Grafana dashboard's queries against two scrapes.

Supported: ``name{label="v", label=~"re", label!="v"}``, ``rate(sel[range])`` and
``increase(sel[range])`` (the difference between the ``before`` and ``after`` scrapes, over
``seconds`` for rate), ``sum [by (labels)] (expr)``, ``histogram_quantile(q, expr)`` and ``a / b``
(one-to-one on identical label sets), numbers. Anything else raises, so a query this cannot read
fails the test instead of passing vacuously. A result is a vector: {labels: value}.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]

_TOKEN = re.compile(r"""\s*(?:(?P<dur>\d+[smhd]\b)|(?P<num>\d+(?:\.\d+)?)|(?P<str>"(?:[^"\\]|\\.)*")|(?P<op>=~|!=|[(){}\[\],=/])
                        |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*))""", re.VERBOSE)


def scrape(text: str) -> Vector:
    """Prometheus text format -> every sample, ``__name__`` among its labels."""
    out: Vector = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[frozenset({**s.labels, "__name__": s.name}.items())] = float(s.value)
    return out


def _tokens(expr: str) -> list[str]:
    pos, out = 0, []
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"cannot read PromQL at {expr[pos:]!r}")
        out.append(m.group(m.lastgroup))
        pos = m.end()
    return out


class Evaluator:
    def __init__(self, before: Vector, after: Vector, seconds: float) -> None:
        self.before, self.after, self.seconds = before, after, seconds

    def eval(self, expr: str) -> Vector:
        self.toks, self.i = _tokens(expr), 0
        v = self._expr()
        if self.i != len(self.toks):
            raise ValueError(f"unread PromQL: {' '.join(self.toks[self.i:])}")
        return v

    # -- parser ---------------------------------------------------------------------------
    def _peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _take(self, want: str | None = None) -> str:
        tok = self._peek()
        if tok is None or (want is not None and tok != want):
            raise ValueError(f"expected {want!r}, got {tok!r}")
        self.i += 1
        return tok

    def _expr(self) -> Vector:
        left = self._term()
        while self._peek() == "/":
            self._take("/")
            right = self._term()
            left = {k: (left[k] / right[k] if right[k] else math.nan) for k in left.keys() & right.keys()}
        return left

    def _term(self) -> Vector:
        tok = self._take()
        if tok in ("rate", "increase"):
            self._take("(")
            name, matchers = self._selector()
            self._take("[")
            self._take()  # the range: two scrapes stand in for it
            self._take("]")
            self._take(")")
            return self._delta(name, matchers, per_second=tok == "rate")
        if tok == "sum":
            by: list[str] | None = None
            if self._peek() == "by":
                self._take("by")
                by = self._label_list()
            self._take("(")
            inner = self._expr()
            self._take(")")
            if by is None and self._peek() == "by":
                self._take("by")
                by = self._label_list()
            return _sum(inner, by or [])
        if tok == "histogram_quantile":
            self._take("(")
            q = float(self._take())
            self._take(",")
            inner = self._expr()
            self._take(")")
            return _quantile(q, inner)
        if tok[0].isdigit():
            return {frozenset(): float(tok)}
        self.i -= 1
        name, matchers = self._selector()
        return {_drop_name(k): v for k, v in self.after.items() if _matches(k, name, matchers)}

    def _label_list(self) -> list[str]:
        self._take("(")
        labels = [self._take()]
        while self._peek() == ",":
            self._take(",")
            labels.append(self._take())
        self._take(")")
        return labels

    def _selector(self) -> tuple[str, list[tuple[str, str, str]]]:
        name = self._take()
        if not re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", name):
            raise ValueError(f"not a metric name: {name!r}")
        matchers: list[tuple[str, str, str]] = []
        if self._peek() == "{":
            self._take("{")
            while self._peek() != "}":
                label, op, value = self._take(), self._take(), self._take()
                if op not in ("=", "!=", "=~") or not value.startswith('"'):
                    raise ValueError(f"unsupported matcher {label}{op}{value}")
                matchers.append((label, op, value[1:-1]))
                if self._peek() == ",":
                    self._take(",")
            self._take("}")
        return name, matchers

    def _delta(self, name: str, matchers: list[tuple[str, str, str]], per_second: bool) -> Vector:
        out: Vector = {}
        for k, v in self.after.items():
            if _matches(k, name, matchers):
                d = v - self.before.get(k, 0.0)
                out[_drop_name(k)] = d / self.seconds if per_second else d
        return out


def _matches(labels: Labels, name: str, matchers: list[tuple[str, str, str]]) -> bool:
    d = dict(labels)
    if d.get("__name__") != name:
        return False
    for label, op, value in matchers:
        have = d.get(label, "")
        if (op == "=" and have != value) or (op == "!=" and have == value) or \
                (op == "=~" and not re.fullmatch(value, have)):
            return False
    return True


def _drop_name(labels: Labels) -> Labels:
    return frozenset((k, v) for k, v in labels if k != "__name__")


def _sum(v: Vector, by: list[str]) -> Vector:
    out: dict[Labels, float] = defaultdict(float)
    for k, value in v.items():
        out[frozenset((a, b) for a, b in k if a in by)] += value
    return dict(out)


def _quantile(q: float, v: Vector) -> Vector:
    """Prometheus's histogram_quantile: linear interpolation inside the bucket that holds rank q*count."""
    groups: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
    for k, value in v.items():
        d = dict(k)
        if "le" not in d:
            continue
        groups[frozenset((a, b) for a, b in k if a != "le")].append((float(d["le"]), value))
    out: Vector = {}
    for k, buckets in groups.items():
        buckets.sort()
        total = buckets[-1][1]
        if total <= 0 or not math.isinf(buckets[-1][0]):
            out[k] = math.nan
            continue
        rank = q * total
        lo_bound, lo_count = 0.0, 0.0
        for bound, count in buckets:
            if count >= rank:
                if math.isinf(bound):
                    out[k] = lo_bound  # in the +Inf bucket: the highest finite bound, as Prometheus
                else:
                    out[k] = lo_bound + (bound - lo_bound) * ((rank - lo_count) / (count - lo_count or 1))
                break
            lo_bound, lo_count = bound, count
    return out
