"""The JSON Schemas shipped with gmem, and validation against them with path-qualified errors.

    gmem/schemas/scenario-1.schema.json   a scenario (gmem run FILE.toml; TOML read as JSON)
    gmem/schemas/sweep-1.schema.json      a sweep spec (gmem sweep SPEC.toml)
    gmem/schemas/result-1.schema.json     every result document (--json, gmem report)

The formats are JSON Schema (draft 2020-12) files rather than Python classes so that one file
documents a format for every consumer: editors complete and check scenario TOML files against
it (taplo, "Even Better TOML"), and tools in any language can check a result document. The
`jsonschema` package validates here; its errors carry the path to the bad value, which is
printed as `steps[4].to: 'sideways' is not one of ['shared', 'private']`.
"""
import json
from functools import lru_cache
from importlib import resources

NAMES = ("scenario", "sweep", "result")
VERSION = 1


class SchemaError(ValueError):
    """A document that does not follow its schema; the message starts with the path."""

    def __init__(self, message, path=""):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


def path(name):
    """The file of schema `name` (one of NAMES) inside the installed package."""
    if name not in NAMES:
        raise ValueError(f"unknown schema {name!r} (one of {', '.join(NAMES)})")
    return resources.files("gmem") / "schemas" / f"{name}-{VERSION}.schema.json"


@lru_cache(maxsize=None)
def load(name):
    """The schema `name` as a dict."""
    return json.loads(path(name).read_text())


@lru_cache(maxsize=None)
def _validator(name):
    try:
        import jsonschema
    except ImportError:
        raise SchemaError("validation needs the jsonschema package: pip install 'kvm-gmem[cli]'") from None
    schema = load(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def format_path(parts):
    """['steps', 4, 'to'] -> 'steps[4].to'."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _deepest(error):
    """The most specific error: jsonschema's best_match, then down into if/then branches."""
    import jsonschema
    e = jsonschema.exceptions.best_match([error])
    while e.context:
        e = jsonschema.exceptions.best_match(e.context)
    return e


def validate(doc, name):
    """Raise SchemaError (the first problem, with its path) unless doc follows schema `name`."""
    import jsonschema
    errors = sorted(_validator(name).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        e = _deepest(jsonschema.exceptions.best_match(errors))
        message = e.message
        if e.validator == "pattern" and "description" in e.schema:     # not the regex: what it means
            message = f"{e.instance!r} is not a {e.absolute_path[-1] if e.absolute_path else 'value'}: " \
                      f"{e.schema['description']}"
        raise SchemaError(message, format_path(e.absolute_path))
    return doc
