"""YAML as the configs read and write it: one loader and one dumper that agree on what is a float.

PyYAML follows YAML 1.1, which reads `1e-5` as a string (it wants a dot: `1.0e-5`); users write `lr: 1e-5`, so
our loader reads it as a float. The dumper quotes a *string* that the loader would read as a float (`'1e3'`), so
a resolved config written and read back (resolved_config.yaml, which every launched worker reads) keeps it a
string.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

FLOAT_TAG = "tag:yaml.org,2002:float"
FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
FLOAT_FIRST = list("-+0123456789.")


class Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` / `3E4` as floats, and refuses a key given twice in one mapping (PyYAML
    keeps the last silently: a second `train:` block would drop the first's settings without a word). Keys
    brought in by a `<<:` merge may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeConstructor reports it
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"key {key!r} given twice (first on line {first.line + 1}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class Dumper(yaml.SafeDumper):
    """SafeDumper that quotes the strings `Loader` would read as floats."""


Loader.add_implicit_resolver(FLOAT_TAG, FLOAT, FLOAT_FIRST)
Dumper.add_implicit_resolver(FLOAT_TAG, FLOAT, FLOAT_FIRST)


def load_yaml(text: str) -> Any:
    """Parse YAML text with `Loader` (yaml.YAMLError on bad syntax or a repeated key)."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def dump_yaml(data: Any, **options: Any) -> str:
    """YAML text of `data` that `load_yaml` reads back equal (options: yaml.dump's, e.g. sort_keys)."""
    return yaml.dump(data, Dumper=Dumper, **options)
