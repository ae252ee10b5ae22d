"""A small MCP server (the SDK's MCPServer, formerly FastMCP) for the tests: text, structured results,
errors, images, a slow tool, a crash, its process id and an environment variable.

    python mcp_server.py            # stdio
    python mcp_server.py http PORT  # streamable HTTP on 127.0.0.1:PORT/mcp, requiring X-Test-Token
"""

import asyncio
import io
import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.utilities.types import Image

app = MCPServer("advisor-test")


@app.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@app.tool()
def fail(message: str) -> str:
    """Always fails with the given message."""
    raise ValueError(message)


@app.tool()
def swatch(color: str = "red", width: int = 64, height: int = 48) -> Image:
    """A solid-colour PNG of the given size."""
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.new("RGB", (width, height), color).save(buf, format="PNG")
    return Image(data=buf.getvalue(), format="png")


@app.tool()
async def slow(seconds: float) -> str:
    """Sleeps, then answers."""
    await asyncio.sleep(seconds)
    return "finally"


@app.tool()
def crash() -> str:
    """Ends the server process at once."""
    os._exit(3)


@app.tool()
def whoami() -> str:
    """The server's process id and ADVISOR_MCP_TEST_VAR."""
    return f"pid={os.getpid()} var={os.environ.get('ADVISOR_MCP_TEST_VAR')}"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "http":
        import uvicorn
        from starlette.responses import PlainTextResponse

        inner = app.streamable_http_app()

        async def guarded(scope, receive, send):
            if scope["type"] == "http":
                headers = dict(scope["headers"])
                if headers.get(b"x-test-token") != os.environ.get("ADVISOR_MCP_TOKEN", "").encode():
                    await PlainTextResponse("forbidden", status_code=403)(scope, receive, send)
                    return
            await inner(scope, receive, send)

        uvicorn.run(guarded, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", lifespan="on")
    else:
        app.run()
