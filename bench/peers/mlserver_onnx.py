"""MLServer runtime around an ONNX Runtime session: what a team would write.

MLServer 1.7.1 ships no ONNX runtime, so this ~20-line ``MLModel`` is the whole
integration. ``predict`` runs the session directly, as MLServer's own runtimes
(mlserver-sklearn, mlserver-xgboost) do: with ``parallel_workers: 0`` that is on
the server's event loop, with workers it is in a worker process.
"""

from __future__ import annotations

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri
from ort_session import open_session


class OnnxModel(MLModel):
    async def load(self) -> bool:
        self._session = open_session(await get_model_uri(self.settings))
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self._outputs, results, strict=True)
            ],
        )
