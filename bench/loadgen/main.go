// Command loadgen drives one fan-out benchmark configuration against one system:
// it connects N websocket subscribers speaking that system's protocol, measures the
// server's RSS per idle connection, then publishes (latency at a fixed rate,
// sustained rate, burst) and counts deliveries and publish-to-receive latency from
// a marker in every payload. It prints one JSON object on stdout.
//
// Every publication carries "bench":"<phase>:<seq>:<sent unix ns>" in its payload;
// subscribers find it by scanning frames, so one frame may carry several messages
// (the channel protocol joins them with "\n") and no frame is JSON-decoded on the
// hot path. Only 127.0.0.1 URLs are accepted.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

const (
	phaseBarrier   = 0
	phaseLatency   = 1
	phaseSustained = 2
	phaseBurst     = 3
	phaseWarm      = 4
	phases         = 5
	clockTicks     = 100 // USER_HZ on Linux
	// How long the sustained phase waits for stragglers after its last publication.
	sustainDrain = 5 * time.Second
)

var phaseNames = map[int]string{
	phaseLatency: "latency", phaseSustained: "sustained", phaseBurst: "burst",
}

type options struct {
	system         string
	subURLs        []string
	pubURL         string
	apiKey         string
	tokens         []string
	subs           int
	channels       int
	serverPids     []int
	extraCPUPids   []int
	burstTarget    int
	rate           float64
	rateSeconds    float64
	sustainRate    float64
	sustainSeconds float64
	pad            int
	concurrency    int
	phaseTimeout   time.Duration
	settleTimeout  time.Duration
}

// --- counting ---------------------------------------------------------------

type tally struct {
	count  [phases]int64 // deliveries per phase
	frames [phases]int64 // frames carrying at least one of the phase's deliveries
	lastNs [phases]int64 // latest receive time per phase
}

var global tally

type sub struct {
	index   int
	channel int
	conn    *websocket.Conn
	mu      sync.Mutex
	lat     [phases][]int64 // publish-to-receive ns (not kept for the barrier)
	seen    [phases]bool
	dropped bool
	closing atomic.Bool
}

var (
	seenBarrier atomic.Int64 // subscribers that received a barrier message
	seenWarm    atomic.Int64
	dropped     atomic.Int64
)

var marker = []byte(`"bench":`)

// record scans one frame for publication markers.
func (s *sub) record(frame []byte, now int64) {
	rest := frame
	locked := false
	var inFrame [phases]bool
	for {
		i := bytes.Index(rest, marker)
		if i < 0 {
			break
		}
		rest = rest[i+len(marker):]
		for len(rest) > 0 && rest[0] == ' ' {
			rest = rest[1:]
		}
		if len(rest) == 0 || rest[0] != '"' {
			continue
		}
		rest = rest[1:]
		end := bytes.IndexByte(rest, '"')
		if end < 0 {
			break
		}
		field := rest[:end]
		rest = rest[end:]
		parts := bytes.SplitN(field, []byte(":"), 3)
		if len(parts) != 3 {
			continue
		}
		ph, err1 := strconv.Atoi(string(parts[0]))
		sent, err2 := strconv.ParseInt(string(parts[2]), 10, 64)
		if err1 != nil || err2 != nil || ph < 0 || ph >= phases {
			continue
		}
		if !locked {
			s.mu.Lock()
			locked = true
		}
		atomic.AddInt64(&global.count[ph], 1)
		if !inFrame[ph] {
			inFrame[ph] = true
			atomic.AddInt64(&global.frames[ph], 1)
		}
		for {
			old := atomic.LoadInt64(&global.lastNs[ph])
			if now <= old || atomic.CompareAndSwapInt64(&global.lastNs[ph], old, now) {
				break
			}
		}
		if !s.seen[ph] {
			s.seen[ph] = true
			if ph == phaseBarrier {
				seenBarrier.Add(1)
			} else if ph == phaseWarm {
				seenWarm.Add(1)
			}
		}
		if ph == phaseLatency || ph == phaseSustained || ph == phaseBurst {
			s.lat[ph] = append(s.lat[ph], now-sent)
		}
	}
	if locked {
		s.mu.Unlock()
	}
}

// --- protocols -----------------------------------------------------------------

func channelKey(c, channels int) string {
	if channels == 1 {
		return "bench"
	}
	return "b" + strconv.Itoa(c)
}

func dial(raw string) (*websocket.Conn, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, err
	}
	if host := u.Hostname(); host != "127.0.0.1" && host != "localhost" {
		return nil, fmt.Errorf("refusing non-loopback URL %s", raw)
	}
	d := websocket.Dialer{HandshakeTimeout: 20 * time.Second, ReadBufferSize: 8192, WriteBufferSize: 1024}
	c, _, err := d.Dial(raw, nil)
	return c, err
}

func readUntil(c *websocket.Conn, s *sub, done func(line []byte) (bool, error)) error {
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	for {
		_, frame, err := c.ReadMessage()
		if err != nil {
			return err
		}
		s.record(frame, time.Now().UnixNano())
		for _, line := range bytes.Split(frame, []byte("\n")) {
			if string(line) == "{}" {
				if err := c.WriteMessage(websocket.TextMessage, []byte("{}")); err != nil {
					return err
				}
				continue
			}
			ok, err := done(line)
			if err != nil || ok {
				return err
			}
		}
	}
}

func replyTo(id int) func([]byte) (bool, error) {
	prefix := []byte(fmt.Sprintf(`{"id":%d,`, id))
	return func(line []byte) (bool, error) {
		if !bytes.HasPrefix(line, prefix) {
			return false, nil
		}
		if bytes.Contains(line, []byte(`"error"`)) {
			return false, fmt.Errorf("command %d refused: %s", id, line)
		}
		return true, nil
	}
}

// open connects one subscriber and subscribes it to its channel.
func open(o *options, s *sub, base string) error {
	key := channelKey(s.channel, o.channels)
	token := ""
	if len(o.tokens) > 0 {
		token = o.tokens[s.index%len(o.tokens)]
	}
	switch o.system {
	case "channel":
		c, err := dial(base)
		if err != nil {
			return err
		}
		s.conn = c
		cmd, _ := json.Marshal(map[string]any{"id": 1, "connect": map[string]any{"token": token}})
		if err := c.WriteMessage(websocket.TextMessage, cmd); err != nil {
			return err
		}
		if err := readUntil(c, s, replyTo(1)); err != nil {
			return err
		}
		cmd = []byte(`{"id":2,"subscribe":{"channel":"task:` + key + `"}}`)
		if err := c.WriteMessage(websocket.TextMessage, cmd); err != nil {
			return err
		}
		return readUntil(c, s, replyTo(2))
	case "centrifuge":
		// Go Centrifuge 0.15 speaks client protocol v1: {"id","method","params"}
		// commands, replies {"id","result"|"error"}, pushes {"result":{"channel",...}}.
		c, err := dial(base)
		if err != nil {
			return err
		}
		s.conn = c
		cmd, _ := json.Marshal(map[string]any{"id": 1, "method": "connect", "params": map[string]any{"token": token}})
		if err := c.WriteMessage(websocket.TextMessage, cmd); err != nil {
			return err
		}
		if err := readUntil(c, s, replyTo(1)); err != nil {
			return err
		}
		cmd = []byte(`{"id":2,"method":"subscribe","params":{"channel":"task:` + key + `"}}`)
		if err := c.WriteMessage(websocket.TextMessage, cmd); err != nil {
			return err
		}
		return readUntil(c, s, replyTo(2))
	case "legacy":
		c, err := dial(base + "?token=" + url.QueryEscape(token))
		if err != nil {
			return err
		}
		s.conn = c
		return c.WriteMessage(websocket.TextMessage, []byte(`{"action":"subscribe","task_id":"`+key+`"}`))
	case "socketio":
		c, err := dial(base)
		if err != nil {
			return err
		}
		s.conn = c
		// Engine.IO v4 open packet, then the Socket.IO v5 namespace connect.
		if err := sioRead(c, s, "0"); err != nil {
			return err
		}
		if err := c.WriteMessage(websocket.TextMessage, []byte("40")); err != nil {
			return err
		}
		if err := sioRead(c, s, "40"); err != nil {
			return err
		}
		// An event with ack id 0; the server enters the room, then acks ("430[...]").
		msg := `420["subscribe","task:` + key + `"]`
		if err := c.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
			return err
		}
		return sioRead(c, s, "430")
	case "ws":
		c, err := dial(base + "?channel=" + url.QueryEscape("task:"+key))
		if err != nil {
			return err
		}
		s.conn = c
		return nil
	}
	return fmt.Errorf("unknown system %q", o.system)
}

func sioRead(c *websocket.Conn, s *sub, prefix string) error {
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	for {
		_, frame, err := c.ReadMessage()
		if err != nil {
			return err
		}
		if string(frame) == "2" {
			if err := c.WriteMessage(websocket.TextMessage, []byte("3")); err != nil {
				return err
			}
			continue
		}
		if bytes.HasPrefix(frame, []byte("44")) {
			return fmt.Errorf("socket.io connect refused: %s", frame)
		}
		if bytes.HasPrefix(frame, []byte(prefix)) {
			return nil
		}
		s.record(frame, time.Now().UnixNano())
	}
}

// readLoop counts deliveries and answers the protocol's application-level pings.
func readLoop(o *options, s *sub) {
	c := s.conn
	for {
		_, frame, err := c.ReadMessage()
		now := time.Now().UnixNano()
		if err != nil {
			if !s.closing.Load() {
				s.dropped = true
				dropped.Add(1)
			}
			return
		}
		switch o.system {
		case "channel":
			if len(frame) == 2 && frame[0] == '{' && frame[1] == '}' {
				_ = c.WriteMessage(websocket.TextMessage, frame)
				continue
			}
			if bytes.Contains(frame, []byte("\n{}")) || bytes.HasPrefix(frame, []byte("{}\n")) {
				for _, line := range bytes.Split(frame, []byte("\n")) {
					if string(line) == "{}" {
						_ = c.WriteMessage(websocket.TextMessage, []byte("{}"))
					}
				}
			}
		case "socketio":
			if len(frame) == 1 && frame[0] == '2' {
				_ = c.WriteMessage(websocket.TextMessage, []byte("3"))
				continue
			}
		}
		s.record(frame, now)
	}
}

// --- publishing -----------------------------------------------------------------

type publisher interface {
	publish(body []byte) error
	close()
}

type httpPublisher struct {
	client *http.Client
	url    string
	apiKey string
}

func (p *httpPublisher) publish(body []byte) error {
	req, err := http.NewRequest(http.MethodPost, p.url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if p.apiKey != "" {
		req.Header.Set("X-API-Key", p.apiKey)
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("publish: HTTP %d: %.200s", resp.StatusCode, answer)
	}
	return nil
}

func (p *httpPublisher) close() { p.client.CloseIdleConnections() }

// wsPublisher sends each body as one text frame (the websockets peer has no HTTP).
type wsPublisher struct {
	mu   sync.Mutex
	conn *websocket.Conn
}

func (p *wsPublisher) publish(body []byte) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conn.WriteMessage(websocket.TextMessage, body)
}

func (p *wsPublisher) close() { p.conn.Close() }

func newPublisher(o *options) (publisher, error) {
	u, err := url.Parse(o.pubURL)
	if err != nil {
		return nil, err
	}
	if host := u.Hostname(); host != "127.0.0.1" && host != "localhost" {
		return nil, fmt.Errorf("refusing non-loopback URL %s", o.pubURL)
	}
	if u.Scheme == "ws" {
		c, err := dial(o.pubURL)
		if err != nil {
			return nil, err
		}
		go func() { // discard anything the peer says; keep control frames flowing
			for {
				if _, _, err := c.ReadMessage(); err != nil {
					return
				}
			}
		}()
		return &wsPublisher{conn: c}, nil
	}
	transport := &http.Transport{MaxIdleConnsPerHost: 64, MaxConnsPerHost: 64, DisableCompression: true}
	return &httpPublisher{client: &http.Client{Transport: transport, Timeout: 60 * time.Second}, url: o.pubURL, apiKey: o.apiKey}, nil
}

// message is one legacy hub message (~200 bytes) for the channel's task.
func message(o *options, phase, seq, channel int, sentNs int64) []byte {
	return []byte(fmt.Sprintf(`{"type":"task.updated","payload":{"task_id":"%s","bench":"%d:%d:%d","pad":"%s"}}`,
		channelKey(channel, o.channels), phase, seq, sentNs, strings.Repeat("x", o.pad)))
}

func batch(msgs [][]byte) []byte {
	if len(msgs) == 1 {
		return msgs[0]
	}
	return append(append([]byte("["), bytes.Join(msgs, []byte(","))...), ']')
}

// --- measurements ------------------------------------------------------------------

func rssKiB(pid int) (int, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			fields := strings.Fields(line)
			return strconv.Atoi(fields[1])
		}
	}
	return 0, errors.New("no VmRSS")
}

func totalRSS(pids []int) int {
	total := 0
	for _, pid := range pids {
		if kib, err := rssKiB(pid); err == nil {
			total += kib
		}
	}
	return total
}

// settledRSS waits until the servers' summed RSS stops moving (4 samples 0.5 s apart
// within max(64 KiB, 0.2 %)).
func settledRSS(pids []int, timeout time.Duration) (int, bool) {
	deadline := time.Now().Add(timeout)
	var samples []int
	for {
		samples = append(samples, totalRSS(pids))
		if n := len(samples); n >= 4 {
			recent := samples[n-4:]
			lo, hi := recent[0], recent[0]
			for _, v := range recent {
				if v < lo {
					lo = v
				}
				if v > hi {
					hi = v
				}
			}
			tolerance := recent[3] / 500
			if tolerance < 64 {
				tolerance = 64
			}
			if hi-lo <= tolerance {
				return recent[3], true
			}
		}
		if time.Now().After(deadline) {
			return samples[len(samples)-1], false
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// cpuSplit is the processes' user and system (kernel) CPU seconds: a write per
// delivery shows as system time.
func cpuSplit(pids []int) (float64, float64) {
	user, sys := 0.0, 0.0
	for _, pid := range pids {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		text := string(data)
		fields := strings.Fields(text[strings.LastIndexByte(text, ')')+2:])
		// After "pid (comm) ": state is field 0, utime 11, stime 12.
		if len(fields) > 12 {
			u, _ := strconv.ParseFloat(fields[11], 64)
			s, _ := strconv.ParseFloat(fields[12], 64)
			user += u / clockTicks
			sys += s / clockTicks
		}
	}
	return user, sys
}

func selfCPU() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

type phaseResult struct {
	Published      int     `json:"published"`
	Expected       int64   `json:"expected"`
	Delivered      int64   `json:"delivered"`
	Frames         int64   `json:"frames"`
	Complete       bool    `json:"complete"`
	PublishSeconds float64 `json:"publish_seconds"`
	Seconds        float64 `json:"seconds"`
	DeliveriesPerS float64 `json:"deliveries_per_s"`
	PublishRate    float64 `json:"publish_rate"`
	DrainMs        float64 `json:"drain_ms"`
	P50Ms          float64 `json:"p50_ms"`
	P99Ms          float64 `json:"p99_ms"`
	MaxMs          float64 `json:"max_ms"`
	LoadgenCPU     float64 `json:"loadgen_cpu_s"`
	ServerCPU      float64 `json:"server_cpu_s"`
	ServerSysCPU   float64 `json:"server_sys_cpu_s"`
	LoadgenShare   float64 `json:"loadgen_cpu_share"`
	ServerShare    float64 `json:"server_cpu_share"`
	PublishErrors  int64   `json:"publish_errors"`
	FirstError     string  `json:"first_error,omitempty"`
}

type result struct {
	System         string                  `json:"system"`
	Subscribers    int                     `json:"subscribers"`
	Channels       int                     `json:"channels"`
	Connected      int                     `json:"connected"`
	ConnectSeconds float64                 `json:"connect_seconds"`
	RSSBeforeKiB   int                     `json:"rss_before_kib"`
	RSSAfterKiB    int                     `json:"rss_after_kib"`
	PerConnKiB     float64                 `json:"per_connection_kib"`
	RSSSettled     bool                    `json:"rss_settled"`
	Dropped        int64                   `json:"dropped"`
	Phases         map[string]*phaseResult `json:"phases"`
	Errors         []string                `json:"errors"`
}

func percentileMs(sorted []int64, q float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	rank := int(math.Ceil(q / 100 * float64(len(sorted))))
	if rank < 1 {
		rank = 1
	}
	return float64(sorted[rank-1]) / 1e6
}

// --- the run -------------------------------------------------------------------------

type runner struct {
	o       *options
	pub     publisher
	subs    []*sub
	perChan []int64 // subscribers of each channel
	seq     int
	sys0    float64 // the servers' system CPU seconds when the current phase began
}

func (r *runner) connect(count, channels int, first int) ([]*sub, []error) {
	out := make([]*sub, count)
	errs := make([]error, count)
	sem := make(chan struct{}, r.o.concurrency)
	var wg sync.WaitGroup
	for i := 0; i < count; i++ {
		s := &sub{index: first + i, channel: i % channels}
		out[i] = s
		wg.Add(1)
		sem <- struct{}{}
		go func(i int, s *sub) {
			defer wg.Done()
			defer func() { <-sem }()
			base := r.o.subURLs[s.index%len(r.o.subURLs)]
			if err := open(r.o, s, base); err != nil {
				errs[i] = err
				if s.conn != nil {
					s.conn.Close()
				}
				s.conn = nil
				return
			}
			go readLoop(r.o, s)
		}(i, s)
	}
	wg.Wait()
	return out, errs
}

// barrier publishes a marker message to every channel until every subscriber has
// received one: then every subscription is in place, whatever the protocol acks.
func (r *runner) barrier(phase int, channels int, want int64, counter *atomic.Int64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for round := 0; ; round++ {
		msgs := make([][]byte, 0, channels)
		for c := 0; c < channels; c++ {
			r.seq++
			msgs = append(msgs, message(r.o, phase, r.seq, c, time.Now().UnixNano()))
		}
		if err := r.publishChunks(msgs, 200); err != nil {
			return err
		}
		wait := time.Now().Add(2 * time.Second)
		for time.Now().Before(wait) {
			if counter.Load() >= want {
				return nil
			}
			time.Sleep(20 * time.Millisecond)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("barrier: %d of %d subscribers ready after %s", counter.Load(), want, timeout)
		}
	}
}

func (r *runner) publishChunks(msgs [][]byte, chunk int) error {
	for start := 0; start < len(msgs); start += chunk {
		end := start + chunk
		if end > len(msgs) {
			end = len(msgs)
		}
		if err := r.pub.publish(batch(msgs[start:end])); err != nil {
			return err
		}
	}
	return nil
}

func (r *runner) waitDeliveries(phase int, expected int64, deadline time.Time) {
	lastCount, lastMove := int64(-1), time.Now()
	for time.Now().Before(deadline) {
		n := atomic.LoadInt64(&global.count[phase])
		if n >= expected {
			return
		}
		if n != lastCount {
			lastCount, lastMove = n, time.Now()
		} else if time.Since(lastMove) > 10*time.Second {
			return // stalled: report what arrived
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (r *runner) finish(phase int, res *phaseResult, start time.Time, lastSend int64, cpu0, srv0 float64) {
	res.Delivered = atomic.LoadInt64(&global.count[phase])
	res.Complete = res.Delivered >= res.Expected
	last := atomic.LoadInt64(&global.lastNs[phase])
	if last > 0 {
		res.Seconds = float64(last-start.UnixNano()) / 1e9
		if res.Seconds > 0 {
			res.DeliveriesPerS = float64(res.Delivered) / res.Seconds
		}
		res.DrainMs = float64(last-lastSend) / 1e6
	}
	wall := time.Since(start).Seconds()
	res.LoadgenCPU = selfCPU() - cpu0
	user, sys := cpuSplit(r.serverPids())
	res.ServerCPU = user + sys - srv0
	res.ServerSysCPU = sys - r.sys0
	res.Frames = atomic.LoadInt64(&global.frames[phase])
	res.LoadgenShare = res.LoadgenCPU / wall
	res.ServerShare = res.ServerCPU / wall
	var all []int64
	for _, s := range r.subs {
		s.mu.Lock()
		all = append(all, s.lat[phase]...)
		s.mu.Unlock()
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	res.P50Ms = percentileMs(all, 50)
	res.P99Ms = percentileMs(all, 99)
	res.MaxMs = percentileMs(all, 100)
}

// cpuNow is the load generator's and the servers' CPU seconds at a phase's start
// (the servers' system share is kept for finish).
func (r *runner) cpuNow() (float64, float64) {
	user, sys := cpuSplit(r.serverPids())
	r.sys0 = sys
	return selfCPU(), user + sys
}

func (r *runner) serverPids() []int {
	return append(append([]int{}, r.o.serverPids...), r.o.extraCPUPids...)
}

// paced publishes one message per tick, rotating over the channels.
func (r *runner) paced(phase int, rate, seconds float64, drain time.Duration) *phaseResult {
	res := &phaseResult{}
	count := int(rate * seconds)
	interval := time.Duration(float64(time.Second) / rate)
	cpu0, srv0 := r.cpuNow()
	start := time.Now()
	var wg sync.WaitGroup
	var errCount atomic.Int64
	var firstErr atomic.Value
	inflight := make(chan struct{}, 32)
	var lastSend int64
	window := time.Duration(seconds * float64(time.Second))
	published := 0
	for i := 0; i < count; i++ {
		if wait := time.Until(start.Add(time.Duration(i) * interval)); wait > 0 {
			time.Sleep(wait)
		}
		// A server that accepts publications slower than the rate ends the phase
		// short of its count: the publisher never runs past the window.
		if time.Since(start) > window {
			break
		}
		published++
		c := i % r.o.channels
		res.Expected += r.perChan[c]
		r.seq++
		lastSend = time.Now().UnixNano()
		body := message(r.o, phase, r.seq, c, lastSend)
		inflight <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-inflight }()
			if err := r.pub.publish(body); err != nil {
				errCount.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
			}
		}()
	}
	res.Published = published
	res.PublishSeconds = time.Since(start).Seconds()
	res.PublishRate = float64(published) / res.PublishSeconds
	wg.Wait()
	r.waitDeliveries(phase, res.Expected, time.Now().Add(drain))
	res.PublishErrors = errCount.Load()
	if v := firstErr.Load(); v != nil {
		res.FirstError = v.(string)
	}
	r.finish(phase, res, start, lastSend, cpu0, srv0)
	return res
}

// burst publishes perChannel messages to every channel as fast as the server takes
// them (arrays of 200 per request), all stamped with the burst's start.
func (r *runner) burst(perChannel int) *phaseResult {
	res := &phaseResult{}
	msgs := make([][]byte, 0, perChannel*r.o.channels)
	cpu0, srv0 := r.cpuNow()
	start := time.Now()
	for k := 0; k < perChannel; k++ {
		for c := 0; c < r.o.channels; c++ {
			r.seq++
			msgs = append(msgs, message(r.o, phaseBurst, r.seq, c, start.UnixNano()))
			res.Expected += r.perChan[c]
		}
	}
	res.Published = len(msgs)
	if err := r.publishChunks(msgs, 200); err != nil {
		res.PublishErrors = 1
		res.FirstError = err.Error()
	}
	res.PublishSeconds = time.Since(start).Seconds()
	res.PublishRate = float64(len(msgs)) / res.PublishSeconds
	r.waitDeliveries(phaseBurst, res.Expected, start.Add(r.o.phaseTimeout))
	r.finish(phaseBurst, res, start, start.UnixNano(), cpu0, srv0)
	return res
}

func run(o *options) *result {
	res := &result{System: o.system, Subscribers: o.subs, Channels: o.channels, Phases: map[string]*phaseResult{}, Errors: []string{}}
	pub, err := newPublisher(o)
	if err != nil {
		res.Errors = append(res.Errors, err.Error())
		return res
	}
	defer pub.close()
	r := &runner{o: o, pub: pub}

	// Warm-up: a few clients come and go so lazy imports and first allocations are
	// not charged to the measured connections.
	warmO := *o
	warmO.channels = 1
	warm := &runner{o: &warmO, pub: pub}
	warmSubs, _ := warm.connect(10, 1, o.subs)
	warm.subs = warmSubs
	if err := warm.barrier(phaseWarm, 1, int64(len(warmSubs)), &seenWarm, 30*time.Second); err != nil {
		res.Errors = append(res.Errors, "warm-up: "+err.Error())
	}
	for _, s := range warmSubs {
		if s.conn != nil {
			s.closing.Store(true)
			s.conn.Close()
		}
	}
	time.Sleep(time.Second)
	res.RSSBeforeKiB, _ = settledRSS(o.serverPids, o.settleTimeout)

	start := time.Now()
	subs, errs := r.connect(o.subs, o.channels, 0)
	r.perChan = make([]int64, o.channels)
	for i, s := range subs {
		if errs[i] == nil {
			r.subs = append(r.subs, s)
			r.perChan[s.channel]++
		}
	}
	res.Connected = len(r.subs)
	res.ConnectSeconds = time.Since(start).Seconds()
	failed := map[string]int{}
	for _, e := range errs {
		if e != nil {
			failed[e.Error()]++
		}
	}
	for text, n := range failed {
		res.Errors = append(res.Errors, fmt.Sprintf("connect (%d times): %s", n, text))
	}
	if len(r.subs) == 0 {
		return res
	}
	if err := r.barrier(phaseBarrier, o.channels, int64(len(r.subs)), &seenBarrier, 60*time.Second); err != nil {
		res.Errors = append(res.Errors, err.Error())
		return res
	}
	var settled bool
	res.RSSAfterKiB, settled = settledRSS(o.serverPids, o.settleTimeout)
	res.RSSSettled = settled
	res.PerConnKiB = float64(res.RSSAfterKiB-res.RSSBeforeKiB) / float64(len(r.subs))

	// Sustained runs last: a system that cannot keep up leaves a backlog behind it.
	if o.rate > 0 && o.rateSeconds > 0 {
		res.Phases[phaseNames[phaseLatency]] = r.paced(phaseLatency, o.rate, o.rateSeconds, o.phaseTimeout)
		time.Sleep(500 * time.Millisecond)
	}
	if o.burstTarget > 0 {
		perChannel := o.burstTarget / len(r.subs)
		if perChannel < 10 {
			perChannel = 10
		}
		if perChannel > 1000 {
			perChannel = 1000
		}
		res.Phases[phaseNames[phaseBurst]] = r.burst(perChannel)
		time.Sleep(time.Second)
	}
	if o.sustainRate > 0 && o.sustainSeconds > 0 {
		// A backlog is the answer here, not something to wait out.
		res.Phases[phaseNames[phaseSustained]] = r.paced(phaseSustained, o.sustainRate, o.sustainSeconds, sustainDrain)
	}
	res.Dropped = dropped.Load()
	for _, s := range r.subs {
		s.closing.Store(true)
		s.conn.Close()
	}
	return res
}

func splitInts(text string) []int {
	var out []int
	for _, part := range strings.Split(text, ",") {
		if part = strings.TrimSpace(part); part != "" {
			if n, err := strconv.Atoi(part); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}

func readTokens(path string) ([]string, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	scanner := bufio.NewScanner(f)
	scanner.Buffer(make([]byte, 64*1024), 1024*1024)
	for scanner.Scan() {
		if line := strings.TrimSpace(scanner.Text()); line != "" {
			out = append(out, line)
		}
	}
	return out, scanner.Err()
}

func main() {
	o := &options{}
	var subURLs, serverPids, extraPids, tokensPath string
	var phaseTimeout, settleTimeout float64
	flag.StringVar(&o.system, "system", "channel", "protocol: channel | centrifuge (v1) | legacy | socketio | ws")
	flag.StringVar(&subURLs, "sub-urls", "", "comma-separated websocket URLs; subscribers take them in turn")
	flag.StringVar(&o.pubURL, "pub-url", "", "http://.../api/v1/broadcast (POST) or ws://... (one frame per publish)")
	flag.StringVar(&o.apiKey, "api-key", "", "X-API-Key for HTTP publishing")
	flag.StringVar(&tokensPath, "tokens", "", "file with one connection token per line")
	flag.IntVar(&o.subs, "subs", 100, "subscribers")
	flag.IntVar(&o.channels, "channels", 1, "channels; subscriber i takes channel i % channels")
	flag.StringVar(&serverPids, "server-pids", "", "server pids whose RSS and CPU are measured")
	flag.StringVar(&extraPids, "extra-cpu-pids", "", "more pids whose CPU counts as server CPU (redis)")
	flag.IntVar(&o.burstTarget, "burst-deliveries", 200000, "burst size in deliveries (0: no burst)")
	flag.Float64Var(&o.rate, "rate", 20, "publications/s of the latency phase")
	flag.Float64Var(&o.rateSeconds, "rate-seconds", 5, "length of the latency phase (0: none)")
	flag.Float64Var(&o.sustainRate, "sustain-rate", 0, "publications/s of the sustained phase")
	flag.Float64Var(&o.sustainSeconds, "sustain-seconds", 0, "length of the sustained phase (0: none)")
	flag.IntVar(&o.pad, "pad", 96, "padding characters per payload (~200-byte messages)")
	flag.IntVar(&o.concurrency, "connect-concurrency", 64, "handshakes in flight")
	flag.Float64Var(&phaseTimeout, "phase-timeout", 60, "seconds a phase may take to deliver")
	flag.Float64Var(&settleTimeout, "settle-timeout", 15, "seconds to wait for the RSS to settle")
	flag.Parse()
	o.subURLs = strings.Split(subURLs, ",")
	o.serverPids = splitInts(serverPids)
	o.extraCPUPids = splitInts(extraPids)
	o.phaseTimeout = time.Duration(phaseTimeout * float64(time.Second))
	o.settleTimeout = time.Duration(settleTimeout * float64(time.Second))
	tokens, err := readTokens(tokensPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	o.tokens = tokens
	if subURLs == "" || o.pubURL == "" || o.channels < 1 || o.subs < o.channels {
		fmt.Fprintln(os.Stderr, "need -sub-urls, -pub-url, and -subs >= -channels >= 1")
		os.Exit(2)
	}
	out, _ := json.Marshal(run(o))
	fmt.Println(string(out))
}
