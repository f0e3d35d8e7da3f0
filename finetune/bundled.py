"""The bundled recipes (``recipes/*.yaml``) and adapter presets (``adapters/*.yaml``), and the lookup of relative
paths that recipes name.

A wheel ships them inside the package (``finetune/recipes``, ``finetune/adapter_presets``; see
``pyproject.toml``); in the source tree and editable installs they sit beside the package.
"""

import shutil
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _folder(name: str, packaged: str | None = None) -> Path:
    for d in (_PACKAGE / (packaged or name), _PACKAGE.parent / name):
        if d.is_dir():
            return d
    raise FileNotFoundError(f"the bundled {name}/ folder is missing from {_PACKAGE} and {_PACKAGE.parent}")


def recipes_dir() -> Path:
    return _folder("recipes")


def adapters_dir() -> Path:
    return _folder("adapters", "adapter_presets")  # not finetune/adapters: that is the adapters module


def bundled() -> dict[str, Path]:
    """Recipe name -> file, sorted by name."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


def describe(path: Path) -> str:
    """A recipe's one-line description: its first comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def find(name_or_path: str) -> Path:
    """A recipe file: an existing path, else a bundled recipe's name (with or without ``.yaml``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    recipes = bundled()
    name = path.name.removesuffix(".yaml")
    if len(path.parts) == 1 and name in recipes:
        return recipes[name]
    raise FileNotFoundError(f"{name_or_path}: no such recipe file, and no bundled recipe of that name; "
                            f"bundled: {list(recipes)}")  # fmt: skip


def copy(name: str, dest: str, *, force: bool = False) -> Path:
    """Copies bundled recipe ``name`` to ``dest`` (a file, or a folder to copy it into)."""
    src = find(name)
    target = Path(dest)
    if target.is_dir():
        target = target / src.name
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    return target


def resolve_path(path: str) -> str:
    """A path a recipe names: as given when it exists (absolute, or relative to the working directory), else
    relative to the bundled recipes folder (so ``data/quickstart/train.txt`` works from anywhere). Anything else
    (e.g. a hub id) is returned unchanged."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return path
    candidate = recipes_dir() / p
    return str(candidate) if candidate.exists() else path
