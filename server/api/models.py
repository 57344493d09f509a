"""ModelService: the catalog's enabled models in OpenAI's list shape."""

from __future__ import annotations

import grpc
from imagegw.v1 import models_pb2, models_pb2_grpc

from server.catalog import ModelCatalog, ModelSpec
from server.errors import InvalidRequestError, NotFoundError

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
        try:
            spec = self._catalog.served_model(request.model)
        except InvalidRequestError as exc:
            # Here the model is the resource the URL names, so not serving it is a 404; a
            # generation names it in its body, so there the same finding is a 400 on `model`.
            raise NotFoundError(exc.message, param="model", code=exc.code) from None
        return _model(spec)


def _model(spec: ModelSpec) -> models_pb2.Model:
    return models_pb2.Model(id=spec.id, object="model", created=spec.created, owned_by=spec.owned_by or spec.provider)
