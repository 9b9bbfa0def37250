// href-counter counts the links on a web page: the classic multi-stage build example.
package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"

	"golang.org/x/net/html"
)

func countLinks(n *html.Node) (internal, external int) {
	if n.Type == html.ElementNode && n.Data == "a" {
		for _, a := range n.Attr {
			if a.Key == "href" {
				if strings.HasPrefix(a.Val, "http") {
					external++
				} else {
					internal++
				}
			}
		}
	}
	for c := n.FirstChild; c != nil; c = c.NextSibling {
		i, e := countLinks(c)
		internal += i
		external += e
	}
	return
}

func main() {
	url := os.Getenv("url")
	resp, err := http.Get(url)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	doc, err := html.Parse(resp.Body)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	i, e := countLinks(doc)
	out, _ := json.Marshal(map[string]int{"internal": i, "external": e})
	fmt.Println(string(out))
}
