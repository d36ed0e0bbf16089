"""C++ direct ingress: a KServe v2 gRPC server inside a pybind11 module that scores a CTR model
on its own C++ threads, with no Python and no GIL on the request path.

``DirectServer`` and ``run_load`` come from the private compiled module ``_direct`` (built from
``cpp/`` by ``pip install``); ``servefleet.direct.ctr`` trains, exports and mirrors the model in numpy.
"""

from servefleet.direct._direct import INPUT_NAME, OUTPUT_NAME, DirectServer, run_load

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "DirectServer", "run_load"]
