"""Validators for OpenAI's own schemas (reference/openai-images-openapi.yaml, beside the
checkout in ../shared), so tests check our answers against the contract, not a copy."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-images-openapi.yaml"


@functools.cache
def _registry() -> Registry[Any]:
    spec = yaml.safe_load(SPEC.read_text())
    return Registry().with_resource("urn:openai", Resource.from_contents(spec, default_specification=DRAFT202012))


def validator(name: str) -> jsonschema.protocols.Validator:
    """A validator for ``components.schemas.<name>`` of OpenAI's spec."""
    schema = {"$ref": f"urn:openai#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema, registry=_registry())
