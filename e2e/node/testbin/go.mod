// A tiny static test program for the real node's tests (e2e/test_node.py): no dependencies.
module kaos.tools/e2e/node/testbin

go 1.26.0
