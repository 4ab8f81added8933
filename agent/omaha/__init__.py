"""The Omaha protocol, sans I/O: model, codec (V3 XML and 3.1 JSON), version rules, user counting."""
from .decode import Limits, decode_request, decode_response
from .encode import encode_request, encode_response
from .model import ProtocolError, Request, Response
from .outcome import (
    AppMissing, AppRejected, NoUpdate, Outcome, PackageOffer, ServerError, Unusable, UpdateOffer, interpret,
)

__all__ = [
    "Limits", "decode_request", "decode_response", "encode_request", "encode_response", "ProtocolError",
    "Request", "Response", "AppMissing", "AppRejected", "NoUpdate", "Outcome", "PackageOffer", "ServerError",
    "Unusable", "UpdateOffer", "interpret",
]
