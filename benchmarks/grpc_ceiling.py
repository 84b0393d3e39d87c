"""What gRPC can reach in one Python process here: a grpc.aio server whose ModelInfer returns a fixed answer (the
shape of digits-cnn's) without reading the request, measured by benchmarks/serving.py with the same h2load run as
torchship's gRPC front.

    python benchmarks/grpc_ceiling.py PORT      # prints "ready" once listening
"""
import asyncio
import sys

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc


class Fixed(service_pb2_grpc.GRPCInferenceServiceServicer):
    async def ModelInfer(self, request, context):
        answer = pb.ModelInferResponse(model_name=request.model_name, model_version="1")
        answer.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
        answer.raw_output_contents.append(bytes(40))
        return answer


async def main(port: int) -> None:
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Fixed(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
