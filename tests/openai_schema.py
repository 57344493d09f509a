"""Validators for OpenAI's own schemas, so tests check our answers against the contract.

``tests/reference/openai-images-openapi.yaml`` is OpenAI's OpenAPI file for the images
paths (trimmed from openai/openai-openapi, unchanged otherwise; the project's reference
copy), kept in the repository so that the tests need nothing beside the checkout."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(__file__).resolve().parent / "reference" / "openai-images-openapi.yaml"


@functools.cache
def _registry() -> Registry[Any]:
    spec = yaml.safe_load(SPEC.read_text())
    return Registry().with_resource("urn:openai", Resource.from_contents(spec, default_specification=DRAFT202012))


def validator(name: str) -> jsonschema.protocols.Validator:
    """A validator for ``components.schemas.<name>`` of OpenAI's spec."""
    schema = {"$ref": f"urn:openai#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema, registry=_registry())
