"""The judge's side of tests/ap_judge.py: runs in the judge's own virtual environment (pydantic
1, globus-sdk 3, globus-action-provider-tools 0.21), never in farcall's.

Reads one JSON request per line on stdin, ``{"kind", "doc", "schema"}``, and answers one
JSON line, ``{"errors": [...]}``: what the package's validators and models say is wrong with
``doc`` (nothing when it passes). Kinds: ``ActionStatus`` and ``ActionRequest`` (the
package's JSON Schemas, then its pydantic models), ``ActionProviderDescription`` and
``ActionLogReturn`` (its models; the description's ``input_schema`` must be a valid JSON
Schema), ``Body`` (``doc`` against the JSON Schema ``schema``, as an introspecting client
would check a request body).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jsonschema  # type: ignore[import-untyped, unused-ignore]
from globus_action_provider_tools import data_types, validation  # type: ignore[import-not-found, unused-ignore]


def _schema_errors(kind: str, doc: Any) -> list[str]:
    result = validation.request_validator(validation.ValidationRequest(kind, doc))
    if not result.errors:
        return []
    # The package scrubs its messages of the data; the test wants to see what was wrong.
    validator = getattr(validation, "_validator_map", {}).get(kind)
    if validator is not None:
        return list(validation.validate_data(doc, validator, scrub_validation_errors=False).errors)
    return list(result.errors)


def _model_errors(model: Any, doc: Any) -> list[str]:
    try:
        model.parse_obj(doc)
    except Exception as e:  # noqa: BLE001 - pydantic 1's ValidationError, or anything else
        return [f"{model.__name__}: {e}"]
    return []


def judge(kind: str, doc: Any, schema: Any = None) -> list[str]:
    if kind == "ActionStatus":
        return _schema_errors(kind, doc) or _model_errors(data_types.ActionStatus, doc)
    if kind == "ActionRequest":
        return _schema_errors(kind, doc) or _model_errors(data_types.ActionRequest, doc)
    if kind == "ActionProviderDescription":
        errors = _model_errors(data_types.ActionProviderDescription, doc)
        if not errors:
            try:
                jsonschema.validators.validator_for(doc["input_schema"]).check_schema(
                    doc["input_schema"])
            except jsonschema.exceptions.SchemaError as e:
                errors.append(f"input_schema is not a valid JSON Schema: {e.message}")
        return errors
    if kind == "ActionLogReturn":
        return _model_errors(data_types.ActionLogReturn, doc)
    if kind == "Body":
        validator = jsonschema.validators.validator_for(schema)(schema)
        return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
    return [f"the judge knows no document kind {kind!r}"]


def main() -> None:
    for line in sys.stdin:
        ask = json.loads(line)
        try:
            errors = judge(ask["kind"], ask["doc"], ask.get("schema"))
        except Exception as e:  # noqa: BLE001 - a crash in the judge is an answer too
            errors = [f"the judge failed: {type(e).__name__}: {e}"]
        sys.stdout.write(json.dumps({"errors": errors}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
