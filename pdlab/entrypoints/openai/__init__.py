"""FastDeploy's OpenAI-compatible API server: `python -m pdlab.entrypoints.openai.api_server`.

- `api_server.py`: the command: flags, the engine instance as a child process, the banner, uvicorn.
- `app.py`: the FastAPI application and its routes.
- `protocol.py`: request and response bodies (pydantic), in OpenAI's shapes.
- `serving.py`: what completions and chat completions share: validation, generation, streaming.
- `serving_completion.py`, `serving_chat.py`: their prompts and response shapes.
- `engine_client.py`: the asyncio zmq client of the instance's engine-worker-queue port.
- `detokenizer.py`: streamed token ids -> text deltas that never run past a stop string.
- `errors.py`: OpenAI's error body for every failure.
"""
