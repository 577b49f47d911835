module dexbench/loadgen

go 1.19

require github.com/gorilla/websocket v1.5.0

// Debian's golang-github-gorilla-websocket-dev: builds offline, no module proxy.
replace github.com/gorilla/websocket => /usr/share/gocode/src/github.com/gorilla/websocket
