// Command gen_golden writes the golden files beside it: the bytes Go Machinery v2 publishes and
// stores for a few signatures, made with Go's own encoding/json.
//
// Run (any Go; these were made with Debian's golang-go 1.19.8, `apt-get install golang-go`):
//
//	cd machinery/tests/golden && go run gen_golden.go
//
// It needs only Go's standard library: the types are copied from Go Machinery v2
// (github.com/RichardKnop/machinery, v2/tasks/signature.go, state.go, result.go), and so are
// the steps its server takes before publishing (v2/server.go SendTask, SendChain, SendGroup,
// SendChord; v2/tasks/workflow.go NewChain, NewGroup, NewChord; v2/tracing/tracing.go
// HeadersWithSpan with no tracer registered, which only turns nil headers into an empty
// map). The AMQP broker publishes json.Marshal(signature) (v2/brokers/amqp/amqp.go Publish);
// the Redis backend stores json.Marshal(taskState) (v2/backends/redis).
//
// machinery/tests/go_golden.rs compares machinery's encoder with these files; the tests never
// need Go.
package main

import (
	"encoding/json"
	"math"
	"math/rand"
	"os"
	"time"
)

// Arg is v2/tasks/signature.go's Arg.
type Arg struct {
	Name  string      `bson:"name"`
	Type  string      `bson:"type"`
	Value interface{} `bson:"value"`
}

// Headers is v2/tasks/signature.go's Headers.
type Headers map[string]interface{}

// Signature is v2/tasks/signature.go's Signature.
type Signature struct {
	UUID                        string
	Name                        string
	RoutingKey                  string
	ETA                         *time.Time
	GroupUUID                   string
	GroupTaskCount              int
	Args                        []Arg
	Headers                     Headers
	Priority                    uint8
	Immutable                   bool
	RetryCount                  int
	RetryTimeout                int
	OnSuccess                   []*Signature
	OnError                     []*Signature
	ChordCallback               *Signature
	BrokerMessageGroupId        string
	SQSReceiptHandle            string
	StopTaskDeletionOnError     bool
	IgnoreWhenTaskNotRegistered bool
}

// TaskResult is v2/tasks/result.go's TaskResult.
type TaskResult struct {
	Type  string      `bson:"type"`
	Value interface{} `bson:"value"`
}

// TaskState is v2/tasks/state.go's TaskState.
type TaskState struct {
	TaskUUID  string        `bson:"_id"`
	TaskName  string        `bson:"task_name"`
	State     string        `bson:"state"`
	Results   []*TaskResult `bson:"results"`
	Error     string        `bson:"error"`
	CreatedAt time.Time     `bson:"created_at"`
	TTL       int64         `bson:"ttl,omitempty"`
}

// headersWithSpan is v2/tracing/tracing.go HeadersWithSpan with no tracer registered.
func headersWithSpan(h Headers) Headers {
	if h == nil {
		h = make(Headers)
	}
	return h
}

// sendTask is what v2/server.go SendTask does to a signature before the broker publishes it
// (the routing key as v2/brokers/amqp AdjustRoutingKey sets it on a direct exchange).
func sendTask(s *Signature) *Signature {
	s.Headers = headersWithSpan(s.Headers)
	if s.RoutingKey == "" {
		s.RoutingKey = "machinery_task"
	}
	return s
}

// newChain is v2/tasks/workflow.go NewChain (UUIDs given).
func newChain(sigs ...*Signature) []*Signature {
	for i := len(sigs) - 1; i > 0; i-- {
		sigs[i-1].OnSuccess = []*Signature{sigs[i]}
	}
	return sigs
}

// newGroup is v2/tasks/workflow.go NewGroup (UUIDs given).
func newGroup(groupUUID string, sigs ...*Signature) []*Signature {
	for _, s := range sigs {
		s.GroupUUID = groupUUID
		s.GroupTaskCount = len(sigs)
	}
	return sigs
}

// sendGroup is what v2/server.go SendGroupWithContext (which SendGroup calls) does: its
// tracing.AnnotateSpanWithGroupInfo sets every member's headers, then each is published as
// it is (the routing key as the broker adjusts it).
func sendGroup(sigs []*Signature) []*Signature {
	for _, s := range sigs {
		s.Headers = headersWithSpan(s.Headers)
	}
	for _, s := range sigs {
		if s.RoutingKey == "" {
			s.RoutingKey = "machinery_task"
		}
	}
	return sigs
}

// sendChord is v2/server.go SendChordWithContext (which SendChord calls) after
// v2/tasks/workflow.go NewChord: AnnotateSpanWithChordInfo sets the callback's headers, then
// the group is sent.
func sendChord(callback *Signature, sigs []*Signature) []*Signature {
	for _, s := range sigs {
		s.ChordCallback = callback
	}
	callback.Headers = headersWithSpan(callback.Headers)
	return sendGroup(sigs)
}

func f64(v float64) Arg { return Arg{Type: "float64", Value: v} }
func i64(v int64) Arg   { return Arg{Type: "int64", Value: v} }
func str(v string) Arg  { return Arg{Type: "string", Value: v} }
func add(uuid string, args ...Arg) *Signature {
	return &Signature{UUID: uuid, Name: "add", Args: args}
}

func write(name string, v interface{}) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	if err := os.WriteFile(name, b, 0o644); err != nil {
		panic(err)
	}
}

func main() {
	// A task with an error callback: SendTask.
	task := add("task_1", i64(1), i64(1))
	task.OnError = []*Signature{{UUID: "task_2", Name: "report"}}
	write("task.json", sendTask(task))

	// A chain as SendChain sends it (v2/README.md's example): only the first link goes
	// through SendTask.
	chain := newChain(
		add("task_1", i64(1), i64(1)),
		add("task_2", i64(5), i64(6)),
		&Signature{UUID: "task_3", Name: "multiply", Args: []Arg{i64(4)}},
	)
	write("chain.json", sendTask(chain[0]))

	// A group of two: SendGroup; the first member's message.
	group := sendGroup(newGroup("group_g", add("task_1", i64(1), i64(1)), add("task_2", i64(2), i64(2))))
	write("group.json", group[0])

	// A chord: SendChord; the first member's message, with the callback in it.
	callback := &Signature{UUID: "chord_c", Name: "multiply", Args: []Arg{i64(4)},
		OnError: []*Signature{{UUID: "task_9", Name: "report"}}}
	chord := sendChord(callback, newGroup("group_g", add("task_1", i64(1), i64(1)), add("task_2", i64(2), i64(2))))
	write("chord.json", chord[0])

	// Floats as Go's floatEncoder writes float64 (encoding/json encode.go): 'f' format, or
	// 'e' below 1e-6 and from 1e21 on, with e-07 cleaned to e-7.
	floats := []float64{8, 0, 0.1, -2.5, 1e20, 123456789012345680000, 1e21, 1.5e300,
		1e-6, 1e-7, 2.5e-10, 5e-324, 1.7976931348623157e308, 100, 1e15, 1e16, 1e17,
		123456.789, -1e21, -1e-7, 0.000123}
	var args []Arg
	for _, f := range floats {
		args = append(args, f64(f))
	}
	args = append(args, Arg{Type: "[]float64", Value: floats})
	// float32 values go through Go's float32 encoder (bits 32).
	args = append(args, Arg{Type: "float32", Value: float32(0.1)})
	args = append(args, Arg{Type: "[]float32", Value: []float32{0.1, 8, 1e-7, 3.4028235e38, 16777216, 1.1}})
	write("floats.json", sendTask(&Signature{UUID: "task_1", Name: "sum_floats", Args: args}))

	// 2,000 more floats, from random bit patterns and at random scales, with their bits.
	rng := rand.New(rand.NewSource(7))
	var bits []uint64
	var random []float64
	for len(random) < 2000 {
		var f float64
		if len(random)%2 == 0 {
			f = math.Float64frombits(rng.Uint64())
		} else {
			f = rng.NormFloat64() * math.Pow(10, float64(rng.Intn(60)-30))
		}
		if math.IsNaN(f) || math.IsInf(f, 0) {
			continue
		}
		bits = append(bits, math.Float64bits(f))
		random = append(random, f)
	}
	write("floats_random_bits.json", bits)
	write("floats_random.json", random)

	// Strings: encoding/json escapes <, > and & (HTML-safe) and U+2028, U+2029.
	// (\b and \f are left out: Go before 1.22 writes them \u0008 and \u000c, Go 1.22 and later
	// \b and \f, as machinery does.)
	strs := sendTask(&Signature{UUID: "task_<1>&", Name: "concat", Args: []Arg{
		str(`<a href="x?a=1&b=2">é😀</a>`),
		str("line\u2028para\u2029end"),
		str("tab\tnl\ncr\r ctl\u0001\u001f del\u007f quote\" back\\ slash/"),
		{Type: "[]string", Value: []string{"<", ">", "&", "&amp;"}},
	}})
	strs.Headers = Headers{"z-last": "1", "a-first": "<&>", "m": map[string]interface{}{"<k>": []interface{}{1, "\u2028"}}}
	write("strings.json", strs)

	// A stored state: SUCCESS with results, as the Redis backend writes it.
	created := time.Date(2026, 11, 29, 20, 17, 52, 337696883, time.UTC)
	write("state.json", &TaskState{
		TaskUUID: "task_1", TaskName: "add", State: "SUCCESS", CreatedAt: created,
		Results: []*TaskResult{
			{Type: "float64", Value: float64(8)},
			{Type: "float64", Value: 1e21},
			{Type: "float64", Value: 1e-7},
			{Type: "string", Value: "<b>&amp;</b>\u2028"},
			{Type: "[]float64", Value: []float64{2, 0.5}},
		},
	})
}
