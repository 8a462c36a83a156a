// Renders Ollama Modelfile templates with Go's text/template, the engine Ollama runs them with, on the data
// shape Ollama gives them (.System, .Prompt, .Response, .Messages with .Role and .Content).
// stdin: [{"template": "...", "system": "...", "messages": [{"role": "user", "content": "..."}]}, ...]
// stdout: the rendered texts, a JSON array in the same order. pipeline/gguf/ollama.py runs it with `go run`.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	out := make([]string, len(cases))
	for i, c := range cases {
		tmpl, err := template.New("modelfile").Parse(c.Template)
		if err != nil {
			fmt.Fprintln(os.Stderr, "template does not parse:", err)
			os.Exit(1)
		}
		var b strings.Builder
		data := map[string]any{"System": c.System, "Prompt": "", "Response": "", "Messages": c.Messages}
		if err := tmpl.Execute(&b, data); err != nil {
			fmt.Fprintln(os.Stderr, "template does not render:", err)
			os.Exit(1)
		}
		out[i] = b.String()
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
