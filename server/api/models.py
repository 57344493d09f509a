"""ModelService: the catalog's enabled models in OpenAI's list shape."""

from __future__ import annotations

import grpc
from imagegw.v1 import models_pb2, models_pb2_grpc

from server.catalog import ModelCatalog, ModelSpec
from server.errors import NotFoundError

__all__ = ["ModelServicer"]


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    """Answers `GET /v1/models` and `GET /v1/models/{model}`."""

    def __init__(self, catalog: ModelCatalog) -> None:
        self._catalog = catalog

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: models_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        return models_pb2.ListModelsResponse(
            object="list", data=[_model(spec) for spec in self._catalog.enabled_models()]
        )

    async def GetModel(  # noqa: N802 - gRPC method name
        self, request: models_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.Model:
        spec = self._catalog.specs.get(request.model)
        if spec is None or not self._catalog.is_enabled(spec):
            raise NotFoundError(f"The model '{request.model}' does not exist.", param="model", code="model_not_found")
        return _model(spec)


def _model(spec: ModelSpec) -> models_pb2.Model:
    return models_pb2.Model(id=spec.id, object="model", created=spec.created, owned_by=spec.owned_by or spec.provider)
