"""Drives a running sigil agent with py-spiffe (the `spiffe` package on PyPI).

py-spiffe rides on grpcio (gRPC C-core), which sends the percent-encoded
socket path as :authority; tests/it/pyspiffe.rs runs this script against
`sigil dev` and asserts on the JSON it prints on stdout, one key per step:
each step's value is what it observed, or {"error": "..."} if it failed.

Usage: python pyspiffe_client.py <workload-api-socket-path>
"""

import json
import sys
import threading

import grpc
from spiffe import WorkloadApiClient

# Bounds on each blocking step, so that a broken server fails the test
# rather than hanging it.
TIMEOUT = 15.0
AUDIENCE = "pyspiffe-test"


def step(results, name, fn):
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - every failure is reported as data
        results[name] = {"error": f"{type(e).__name__}: {e}"}


def first_from_stream(start):
    """Starts a py-spiffe watch and returns its first update (or error)."""
    got = {}
    done = threading.Event()

    def on_success(update):
        if not done.is_set():
            got["update"] = update
            done.set()

    def on_error(err):
        if not done.is_set():
            got["error"] = err
            done.set()

    handler = start(on_success, on_error)
    try:
        if not done.wait(TIMEOUT):
            raise TimeoutError("no update from the stream")
        if "error" in got:
            raise got["error"]
        return got["update"]
    finally:
        handler.cancel()


def main():
    socket_path = sys.argv[1]
    results = {}
    client = WorkloadApiClient(socket_path=f"unix:{socket_path}", default_timeout=TIMEOUT)

    def x509_svid():
        svid = client.fetch_x509_svid()
        return {"spiffe_id": str(svid.spiffe_id), "chain_len": len(svid.cert_chain)}

    def x509_stream():
        ctx = first_from_stream(client.stream_x509_contexts)
        return {
            "spiffe_id": str(ctx.default_svid.spiffe_id),
            "bundle_trust_domains": sorted(
                b.trust_domain.name for b in ctx.x509_bundle_set.bundles
            ),
        }

    def x509_bundles():
        bundles = client.fetch_x509_bundles()
        return {b.trust_domain.name: len(b.x509_authorities) for b in bundles.bundles}

    def jwt_svid():
        svid = client.fetch_jwt_svid(audience={AUDIENCE})
        results["_token"] = svid.token
        return {"spiffe_id": str(svid.spiffe_id), "audience": sorted(svid.audience)}

    def jwt_bundles():
        bundles = client.fetch_jwt_bundles()
        return {b.trust_domain.name: len(b.jwt_authorities) for b in bundles.bundles}

    def jwt_bundles_stream():
        bundles = first_from_stream(client.stream_jwt_bundles)
        return sorted(b.trust_domain.name for b in bundles.bundles)

    def validate():
        svid = client.validate_jwt_svid(results["_token"], AUDIENCE)
        return {"spiffe_id": str(svid.spiffe_id)}

    def validate_wrong_audience():
        token = results["_token"]
        try:
            client.validate_jwt_svid(token, "someone-else")
        except Exception as e:  # noqa: BLE001
            return {"refused": type(e).__name__}
        return {"refused": None}

    def missing_header():
        # Plain grpcio, without py-spiffe's interceptor that adds the header.
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            call = channel.unary_stream(
                "/SpiffeWorkloadAPI/FetchX509SVID",
                request_serializer=lambda m: m,
                response_deserializer=lambda m: m,
            )
            try:
                next(iter(call(b"", timeout=TIMEOUT)))
            except grpc.RpcError as e:
                return {"code": e.code().name, "details": e.details()}
            return {"code": "OK"}

    step(results, "x509_svid", x509_svid)
    step(results, "x509_stream", x509_stream)
    step(results, "x509_bundles", x509_bundles)
    step(results, "jwt_svid", jwt_svid)
    step(results, "jwt_bundles", jwt_bundles)
    step(results, "jwt_bundles_stream", jwt_bundles_stream)
    step(results, "validate_jwt_svid", validate)
    step(results, "validate_wrong_audience", validate_wrong_audience)
    step(results, "missing_header", missing_header)
    results.pop("_token", None)
    client.close()
    json.dump(results, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
