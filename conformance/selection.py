"""What a run runs, resolved once by the command line: the workloads (a tier, a model's cases,
a cases file, ids; sharded; preset cases lowered to shapes) × the backends, filtered by `-k`.
Every mistake is a ValueError naming the option (the CLI prints one line and exits 2)."""

from __future__ import annotations

from conformance.cases import Case, lower, select_cases
from conformance.engine import Test
from conformance.generate import generate, generate_for_models, shard
from conformance.models import model_names
from conformance.shapes import Shape

# A --backend-module run's default output: USER_OUT/<its name> (never the project's own set).
USER_OUT = "reports/out/backends"


def check_model(
    model: str | None, ids: list[str] | None = None, cases_file: str | None = None
) -> None:
    """--model names a preset (or `all`), whatever else the command line says: a typo is a
    ValueError naming the known presets. With --case, every id must be a case of that model;
    --cases is another source of cases, so the two together are refused."""
    if not model:
        return
    names = model_names(model)
    if cases_file:
        raise ValueError(
            f"--model {model} and --cases {cases_file} are two sources of cases: give one"
        )
    for case_id in ids or []:
        if case_id.rpartition("~")[0] not in names:
            raise ValueError(f"--case {case_id}: not a case of --model {model}")


def workloads(
    tier: str,
    model: str | None = None,
    cases_file: str | None = None,
    ids: list[str] | None = None,
    shard_spec: str | None = None,
) -> list[Shape]:
    """--case / --cases, else the cases around --model, else the tier's; sharded, lowered."""
    check_model(model, ids, cases_file)
    cases = select_cases(ids, cases_file)
    if cases is None:
        cases = generate_for_models(tier, model) if model else generate(tier)
    shapes = [lower(c) if isinstance(c, Case) else c for c in shard(cases, shard_spec)]
    if cases_file:  # the user's own shapes: one that no memory here holds is their mistake
        from conformance.runner import check_fits

        check_fits(shapes, f"--cases {cases_file}")
    return shapes


def backends(names: list[str] | None, modules: list[str] | None) -> list[tuple[object, str]]:
    """(backend, its module spec or '') for --backend NAME ... and --backend-module SPEC ...:
    every registered backend but the reference when neither is given. A name given twice runs
    once; two backends with one name (a module's class named like a built-in) are refused."""
    from optimized.backend import backend_names, canonical_spec, get_backend, load_backend

    chosen = []
    for spec in dict.fromkeys(modules or []):
        try:
            chosen.append((load_backend(spec), canonical_spec(spec)))
        except ValueError:
            raise
        except Exception as e:  # an import error, or the class's constructor failed
            raise ValueError(f"--backend-module {spec}: {_one_line(e, spec)}") from None
    if names is None:
        names = [] if chosen else [n for n in backend_names() if n != "reference"]
    known = backend_names()
    for n in names:
        if n not in known:
            raise ValueError(f"--backend: unknown backend {n!r}; known: {known}")
    picked = [(get_backend(n), "") for n in dict.fromkeys(names)] + chosen
    seen: dict[str, str] = {}
    for b, spec in picked:
        name = str(b.name)
        if not name:
            raise ValueError(f"--backend-module {spec}: its backend has no name")
        if name in seen:
            raise ValueError(
                f"two backends named {name!r} ({seen[name] or 'built-in'} and "
                f"{spec or 'built-in'}): give the external one another `name`"
            )
        seen[name] = spec
    return picked


def _one_line(e: Exception, spec: str) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {first}"
    if isinstance(e, ModuleNotFoundError):
        text += (
            f" (run from the folder that holds it, put that folder on PYTHONPATH, or give the "
            f"file: --backend-module path/to/file.py:{spec.rpartition(':')[2]})"
        )
    return text


def keyword_filter(expr: str | None):
    """`-k EXPR` as a predicate over a test id `CASE_ID::BACKEND` (pytest's -k syntax: and, or,
    not, parentheses; a word matches when it is a case-insensitive substring of the id)."""
    if not expr:
        return lambda test_id: True
    from _pytest.mark.expression import Expression

    try:
        compiled = Expression.compile(expr)
    except SyntaxError as e:
        raise ValueError(f"-k: not a valid expression ({e.msg}): {expr!r}") from None
    return lambda test_id: compiled.evaluate(lambda word, **_: word.lower() in test_id.lower())


def tests(
    shapes: list[Shape], picked: list[tuple[object, str]], expr: str | None = None
) -> list[Test]:
    """Case-major: a case's backends run back to back (they share its cached reference)."""
    keep = keyword_filter(expr)
    return [
        Test(s, b.name, spec) for s in shapes for b, spec in picked if keep(f"{s.id}::{b.name}")
    ]
