"""The shape of the code, checked: the layers of docs/architecture.md (no module imports from a
layer above its own), no import circle (counting function-local imports, so none exists to
break one), the spec and the sandbox importing nothing of the package, every actor implementing
its role's interface, no source file over 500 lines, and the README's layout and the
architecture page naming every part of the package."""
import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "prorl_actors"

# the layers of docs/architecture.md, lowest first: a unit imports only from its layer or below
LAYERS = [
    ("foundation", ["errors", "events", "quiet", "spec"]),
    ("contracts, data and math", ["roles", "batch", "algo", "tasks", "metrics"]),
    ("models, records' sinks, loading", ["config", "tinymodel", "engines", "checkpoint", "exporter", "trackers",
                                         "plots"]),
    ("actors", ["actors"]),
    ("the fleet", ["group", "placement", "sync"]),
    ("runtime", ["runtime", "evaluate"]),
    ("the recipe", ["supervisor"]),
    ("commands", ["cli", "monitor"]),
]
LAYER_OF = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _unit(module: str) -> str:
    """prorl_actors.tasks.families -> tasks; prorl_actors -> the package itself ("")."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks (imports for annotations only, never run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module of the package, line, function-local) for every import a module makes,
    `from pkg import submodule` resolved to the submodule."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        local = id(node) not in top
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, local) for a in node.names if a.name.startswith("prorl_actors")]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: a relative import (the package imports absolutely)"
            target = node.module or ""
            if not target.startswith("prorl_actors"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub if sub in MODULES else target, node.lineno, local))
    return out


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in MODULES} - {""}
    assert units == set(LAYER_OF), (f"not in a layer: {sorted(units - set(LAYER_OF))}; "
                                    f"in a layer but gone: {sorted(set(LAYER_OF) - units)}")


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for module in MODULES:
        src = _unit(module)
        if not src:
            continue
        for target, line, _ in _imports(module):
            dst = _unit(target)
            if dst and LAYER_OF[dst] > LAYER_OF[src]:
                upward.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {src} (layer {LAYER_OF[src]}) imports "
                              f"{target} (layer {LAYER_OF[dst]}: {LAYERS[LAYER_OF[dst]][0]})")
    assert not upward, "imports upward across the layers of docs/architecture.md:\n" + "\n".join(upward)


def test_no_import_circle_even_counting_function_local_imports():
    """With every import at module level, the modules of the package would still import in
    some order: so no function-local import is there to break a circle."""
    graph = {m: {t for t, _, _ in _imports(m) if t != m and t in MODULES} for m in MODULES}
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                circles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m)
    # `from prorl_actors.tasks import ifeval` is an import of the submodule, not of the package's
    # __init__ (which may itself import its submodules): only real circles remain
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_spec_imports_only_errors_and_the_sandbox_nothing_of_the_package():
    for module in MODULES:
        if _unit(module) == "spec":
            others = {t for t, _, _ in _imports(module) if _unit(t) not in ("spec", "errors")}
            assert not others, f"{module} imports {others}"
    for path in (ROOT / "sandbox").rglob("*.py"):
        assert "prorl_actors" not in path.read_text(), path


def test_every_actor_implements_its_roles_interface():
    from prorl_actors.actors.generator import GeneratorActor
    from prorl_actors.actors.learner import LearnerActor
    from prorl_actors.actors.reference import ReferenceActor
    from prorl_actors.actors.verifier import VerifierActor
    from prorl_actors.roles import INTERFACE, RESTART, Restart, Role, RoleActor

    actors = {Role.GENERATOR: GeneratorActor, Role.VERIFIER: VerifierActor, Role.REFERENCE: ReferenceActor,
              Role.LEARNER: LearnerActor}
    assert set(actors) == set(Role) == set(INTERFACE) == set(RESTART)
    for role, cls in actors.items():
        assert issubclass(cls, RoleActor), cls
        interface = INTERFACE[role]
        declared = [n for n, v in vars(interface).items() if callable(v) and not n.startswith("_")]
        assert "ping" in declared
        for name in declared:
            want = inspect.signature(getattr(interface, name))
            got = inspect.signature(getattr(cls, name))
            assert list(got.parameters) == list(want.parameters), f"{cls.__name__}.{name}{got} != {want}"
        public = {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}
        assert public <= set(declared), f"{cls.__name__} answers {public - set(declared)}, not in {interface.__name__}"
    assert RESTART[Role.LEARNER] is Restart.ROLL_BACK and RESTART[Role.REFERENCE] is Restart.REBUILD


def test_the_families_are_written_once():
    from prorl_actors.spec import FAMILIES, PromptsSpec
    from prorl_actors.tasks.families import FAMILY_TYPES, make_families

    assert tuple(f.name for f in dataclasses.fields(PromptsSpec)) == FAMILIES
    assert set(FAMILY_TYPES) == set(FAMILIES) and list(make_families()) == list(FAMILIES)


@pytest.mark.parametrize("folder", ["prorl_actors", "sandbox", "benchmarks", "tests"])
def test_no_source_file_over_500_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_readme_layout_and_architecture_page_name_every_part_of_the_package():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 5)]
    page = (ROOT / "docs" / "architecture.md").read_text()
    for unit in LAYER_OF:
        name = unit if (PKG / unit).is_dir() else f"{unit}.py"
        shown = unit + "/" if (PKG / unit).is_dir() else name
        assert re.search(rf"(^|\s){re.escape(shown)}", layout, re.M), f"README's Layout does not name {shown}"
        assert re.search(rf"`{re.escape(unit)}`|{re.escape(shown)}", page), f"docs/architecture.md does not name {unit}"
    for i, (_, units) in enumerate(LAYERS):     # the page's layer table says the same as LAYERS
        row = next((ln for ln in page.splitlines() if re.match(rf"\|\s*{i}\s*\|", ln)), None)
        assert row is not None, f"docs/architecture.md has no row for layer {i}"
        assert all(f"`{u}`" in row for u in units), (row, units)
