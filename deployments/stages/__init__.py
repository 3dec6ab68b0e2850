"""The Serve stages of the graph, each its own deployment: the TextEncoder, the Denoiser (with the request
scheduler that orders its step loop), the VAEEncoder and the VAEDecoder, and the messages that cross between
them (messages). A stage imports no other stage and nothing of the HTTP side."""
