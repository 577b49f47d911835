// Command centrifuge_go is the benchmark's anchor: a small server on the Go
// Centrifuge library (Debian's golang-github-centrifugal-centrifuge-dev, client
// protocol v1 JSON) that takes the shim's ingest shape, POST /api/v1/broadcast with
// one legacy hub message or an array of them, and publishes each to task:<task_id>
// and to global, with history, as the shim routes them.
//
// It listens on 127.0.0.1 only and prints "peer listening on 127.0.0.1:PORT".
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/centrifugal/centrifuge"
)

type hubMessage struct {
	Type    string `json:"type"`
	Payload struct {
		TaskID string `json:"task_id"`
	} `json:"payload"`
}

type ingest struct {
	node        *centrifuge.Node
	apiKey      string
	historySize int
	historyTTL  time.Duration
	global      string
}

func (h *ingest) publish(raw json.RawMessage) error {
	var msg hubMessage
	if err := json.Unmarshal(raw, &msg); err != nil {
		return err
	}
	if msg.Type == "" {
		return fmt.Errorf("message without type")
	}
	opt := centrifuge.WithHistory(h.historySize, h.historyTTL)
	if msg.Payload.TaskID != "" {
		if _, err := h.node.Publish("task:"+msg.Payload.TaskID, raw, opt); err != nil {
			return err
		}
	}
	_, err := h.node.Publish(h.global, raw, opt)
	return err
}

func (h *ingest) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, `{"error":"POST only"}`, http.StatusMethodNotAllowed)
		return
	}
	if h.apiKey != "" && r.Header.Get("X-API-Key") != h.apiKey {
		http.Error(w, `{"error":"bad api key"}`, http.StatusUnauthorized)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 16<<20))
	if err != nil {
		http.Error(w, `{"error":"read"}`, http.StatusBadRequest)
		return
	}
	body = bytes.TrimSpace(body)
	var batch []json.RawMessage
	if len(body) > 0 && body[0] == '[' {
		err = json.Unmarshal(body, &batch)
	} else {
		batch = []json.RawMessage{body}
	}
	if err != nil {
		http.Error(w, `{"error":"invalid JSON"}`, http.StatusBadRequest)
		return
	}
	for _, raw := range batch {
		if err := h.publish(raw); err != nil {
			http.Error(w, fmt.Sprintf(`{"error":%q}`, err.Error()), http.StatusBadRequest)
			return
		}
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = fmt.Fprintf(w, `{"accepted":%d}`, len(batch))
}

func main() {
	historySize := flag.Int("history-size", 100, "publications kept per channel (the shim's default)")
	historyTTL := flag.Duration("history-ttl", 300*time.Second, "history lifetime (the shim's default)")
	flag.Parse()

	node, err := centrifuge.New(centrifuge.DefaultConfig)
	if err != nil {
		log.Fatal(err)
	}
	// The bench's subscribers authenticate with a JWT; verifying it is connect-time
	// work no phase measures, so every connection is one anonymous-but-named user.
	node.OnConnecting(func(ctx context.Context, e centrifuge.ConnectEvent) (centrifuge.ConnectReply, error) {
		return centrifuge.ConnectReply{Credentials: &centrifuge.Credentials{UserID: "bench"}}, nil
	})
	node.OnConnect(func(client *centrifuge.Client) {
		client.OnSubscribe(func(e centrifuge.SubscribeEvent, cb centrifuge.SubscribeCallback) {
			cb(centrifuge.SubscribeReply{}, nil)
		})
	})
	if err := node.Run(); err != nil {
		log.Fatal(err)
	}

	mux := http.NewServeMux()
	mux.Handle("/connection/websocket", centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{
		CheckOrigin: func(*http.Request) bool { return true },
	}))
	mux.Handle("/api/v1/broadcast", &ingest{
		node: node, apiKey: os.Getenv("DEX_BENCH_API_KEY"),
		historySize: *historySize, historyTTL: *historyTTL, global: "global",
	})

	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("peer listening on %s\n", listener.Addr().String())
	server := &http.Server{Handler: mux}
	go func() {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
		<-stop
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = server.Shutdown(ctx)
		_ = node.Shutdown(ctx)
	}()
	if err := server.Serve(listener); err != nil && err != http.ErrServerClosed {
		log.Fatal(err)
	}
}
