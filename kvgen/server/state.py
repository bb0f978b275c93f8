"""What every route shares: the model, its engine thread, the metrics and the settings."""

from dataclasses import dataclass

from ..llm import LLM
from .chat_template import ChatTemplate
from .engine_loop import EngineLoop
from .errors import ApiError
from .metrics import Metrics


@dataclass
class ServerState:
    llm: LLM
    engine_loop: EngineLoop
    metrics: Metrics
    model_name: str
    chat_template: ChatTemplate | None
    api_key: str | None
    max_body_bytes: int
    created: int  # Unix time the server started, reported as the model's creation time

    def check_model(self, name: str | None):
        """Accept a request for the served model (or naming none); else raise a 404."""
        if name is not None and name != self.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "kvgen", "max_model_len": self.llm.config.max_seq_len}
