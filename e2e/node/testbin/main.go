// Command testbin is the one program of the real node's test image (e2e/test_node.py): shell-less,
// static, a few subcommands that let a test see what a container sees.
//
//	testbin serve PORT          HTTP: /healthz (200), /file?path=P (its content), /env?name=N (its value),
//	                            / (hostname); logs each request to stdout
//	testbin write PATH TEXT     write TEXT to PATH, then exit 0 (an init container)
//	testbin cat PATH...         print the files
//	testbin env NAME            print the variable (exit 1 if unset)
//	testbin get URL             GET the URL and print the body (exit 1 unless 200)
//	testbin fail CODE           print a line and exit with CODE
//	testbin sleep               block until SIGTERM
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fatal("usage: testbin serve|write|cat|env|get|fail|sleep ...")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "serve":
		serve(arg(args, 0))
	case "write":
		if err := os.WriteFile(arg(args, 0), []byte(arg(args, 1)), 0o644); err != nil {
			fatal(err.Error())
		}
	case "cat":
		for _, p := range args {
			data, err := os.ReadFile(p)
			if err != nil {
				fatal(err.Error())
			}
			os.Stdout.Write(data)
		}
	case "env":
		v, ok := os.LookupEnv(arg(args, 0))
		if !ok {
			fatal(arg(args, 0) + " is not set")
		}
		fmt.Println(v)
	case "get":
		get(arg(args, 0))
	case "fail":
		code, err := strconv.Atoi(arg(args, 0))
		if err != nil {
			fatal(err.Error())
		}
		fmt.Printf("testbin: failing with exit code %d\n", code)
		os.Exit(code)
	case "sleep":
		wait := make(chan os.Signal, 1)
		signal.Notify(wait, syscall.SIGTERM, syscall.SIGINT)
		<-wait
	default:
		fatal("unknown subcommand " + os.Args[1])
	}
}

func arg(args []string, i int) string {
	if i >= len(args) {
		fatal("missing argument")
	}
	return args[i]
}

func fatal(msg string) {
	fmt.Fprintln(os.Stderr, "testbin: "+msg)
	os.Exit(1)
}

func serve(port string) {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	mux.HandleFunc("/file", func(w http.ResponseWriter, r *http.Request) {
		data, err := os.ReadFile(r.URL.Query().Get("path"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		w.Write(data)
	})
	mux.HandleFunc("/env", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, os.Getenv(r.URL.Query().Get("name")))
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		host, _ := os.Hostname()
		fmt.Fprintf(w, "hello from %s\n", host)
	})
	logged := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Printf("%s %s %s\n", time.Now().Format(time.RFC3339), r.Method, r.URL)
		mux.ServeHTTP(w, r)
	})
	fmt.Printf("testbin: serving on :%s\n", port)
	fatal((&http.Server{Addr: ":" + port, Handler: logged, ReadHeaderTimeout: 10 * time.Second}).ListenAndServe().Error())
}

func get(url string) {
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		fatal(err.Error())
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	os.Stdout.Write(body)
	if resp.StatusCode != http.StatusOK {
		fatal(resp.Status)
	}
}
