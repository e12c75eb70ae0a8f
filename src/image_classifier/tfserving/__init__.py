"""TensorFlow Serving's protocol, defined once: what the model server speaks and clients parse.

One module per part of the contract, each the single home of its vocabulary:

- :mod:`.rest`: the REST URL grammar (``/v1/models/NAME[/versions/N]:predict``, ...).
- :mod:`.status`: model version states and the status body.
- :mod:`.json_tensor`: JSON <-> tensors for ``:predict``, both the server's and the client's side.
- :mod:`.signatures`: a SavedModel's ``signature_def`` as TF Serving reads and reports it.
- :mod:`.errors`: canonical status codes, their HTTP statuses, TensorFlow error mapping.
- :mod:`.config`: TF Serving's text-proto config files, parsed with its own message types.

The embedded model server, the gateway's TF Serving backend, the ``serve`` supervisor and the
tests import these. Nothing here imports TensorFlow or a web framework at import time (the
signature and config readers import protobuf message types when called), so the gateway can use
this package without TensorFlow.
"""
