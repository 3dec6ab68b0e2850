"""The HTTP side of the app: the FastAPI ingress and its routes (ingress), the request and response models
(protocol), reading an edit's body (edit_body), the error shape (errors), API keys and body limits (guard),
the request checks before the graph runs (admission), a request's graph of stage calls (graph) and the
rules of running it (graph_runner: timeout, re-runs, error mapping), and the object store of
`response_format=url`."""
