//! A small XML DOM (parsed with quick-xml) and Canonical XML 1.0 / Exclusive Canonical
//! XML 1.0 serialisation, as needed for XML-DSig over metadata entries.
//!
//! The DOM keeps qualified names with their prefixes, attributes in document order and
//! namespace declarations as attributes, which is what canonicalisation needs. Line ends
//! and attribute values are normalised as an XML processor must. DTDs are refused.

use std::collections::BTreeMap;

use quick_xml::events::Event;
use quick_xml::Reader;

use crate::error::{Error, Result};

/// Namespace of the `xml` prefix.
pub const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";

/// A node of the tree.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    Element(Element),
    Text(String),
    Comment(String),
    /// Processing instruction: target, data.
    Pi(String, String),
}

/// An element with its qualified name, attributes (including `xmlns` declarations) and
/// children.
#[derive(Clone, Debug, PartialEq)]
pub struct Element {
    /// Qualified name as written (`prefix:local` or `local`).
    pub name: String,
    /// Namespace URI of the element ("" if none).
    pub ns: String,
    /// Attributes in document order: (qualified name, value).
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
}

/// A parsed document: the nodes before the document element (comments and PIs), the
/// document element and the nodes after it.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub prolog: Vec<Node>,
    pub root: Element,
    pub epilog: Vec<Node>,
}

fn split_qname(q: &str) -> (&str, &str) {
    match q.split_once(':') {
        Some((p, l)) => (p, l),
        None => ("", q),
    }
}

impl Element {
    /// Local part of the name.
    pub fn local_name(&self) -> &str {
        split_qname(&self.name).1
    }

    /// Prefix of the name ("" for none).
    pub fn prefix(&self) -> &str {
        split_qname(&self.name).0
    }

    /// Value of the attribute with this qualified name.
    pub fn attr(&self, qname: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == qname)
            .map(|(_, v)| v.as_str())
    }

    /// Namespace declarations on this element: (prefix, uri), "" being the default.
    pub fn ns_decls(&self) -> impl Iterator<Item = (&str, &str)> {
        self.attrs.iter().filter_map(|(n, v)| {
            if n == "xmlns" {
                Some(("", v.as_str()))
            } else {
                n.strip_prefix("xmlns:").map(|p| (p, v.as_str()))
            }
        })
    }

    /// Whether this is `{ns}local`.
    pub fn is(&self, ns: &str, local: &str) -> bool {
        self.ns == ns && self.local_name() == local
    }

    /// Child elements with their index in `children`.
    pub fn child_elements(&self) -> impl Iterator<Item = (usize, &Element)> {
        self.children
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match n {
                Node::Element(e) => Some((i, e)),
                _ => None,
            })
    }

    /// First child element `{ns}local`.
    pub fn child(&self, ns: &str, local: &str) -> Option<&Element> {
        self.child_elements()
            .map(|(_, e)| e)
            .find(|e| e.is(ns, local))
    }

    /// Concatenated text of this element's direct text children.
    pub fn text(&self) -> String {
        self.children
            .iter()
            .filter_map(|n| match n {
                Node::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The element at `path` (indices into `children`) below this one.
    pub fn at_path(&self, path: &[usize]) -> Option<&Element> {
        let mut e = self;
        for i in path {
            e = match e.children.get(*i)? {
                Node::Element(c) => c,
                _ => return None,
            };
        }
        Some(e)
    }
}

/// XML 1.0's NameStartChar, without ':' (namespaces make names colon-separated NCNames).
fn is_name_start_char(c: char) -> bool {
    matches!(c,
        'A'..='Z' | '_' | 'a'..='z' | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}'
        | '\u{F8}'..='\u{2FF}' | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}'
        | '\u{200C}'..='\u{200D}' | '\u{2070}'..='\u{218F}' | '\u{2C00}'..='\u{2FEF}'
        | '\u{3001}'..='\u{D7FF}' | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}'
        | '\u{10000}'..='\u{EFFFF}')
}

fn is_name_char(c: char) -> bool {
    is_name_start_char(c)
        || matches!(c, '-' | '.' | '0'..='9' | '\u{B7}' | '\u{300}'..='\u{36F}' | '\u{203F}'..='\u{2040}')
}

/// quick-xml takes any bytes up to whitespace, '/' or '>' as a name, so `<$//>` would be an
/// element named `$/` whose canonical form (`<$/></$/>`) no parser reads back. A name must
/// be a QName: one NCName, or two joined by a single ':'.
fn check_qname(name: &str, what: &str) -> Result<()> {
    let ncname = |part: &str| {
        let mut chars = part.chars();
        chars.next().is_some_and(is_name_start_char) && chars.all(is_name_char)
    };
    let valid = match name.split_once(':') {
        None => ncname(name),
        Some((prefix, local)) => ncname(prefix) && ncname(local),
    };
    if valid {
        Ok(())
    } else {
        Err(Error::Xml(format!(
            "'{name}' is not a valid XML {what} name"
        )))
    }
}

fn xml_err(e: impl std::fmt::Display) -> Error {
    Error::Xml(e.to_string())
}

/// Replace `\t`, `\n` by spaces (the input has normalised line ends) then resolve
/// references: attribute-value normalisation for CDATA attributes.
fn attr_value(raw: &str) -> Result<String> {
    let spaced: String = raw
        .chars()
        .map(|c| if c == '\t' || c == '\n' { ' ' } else { c })
        .collect();
    quick_xml::escape::unescape(&spaced)
        .map(|c| c.into_owned())
        .map_err(|e| Error::Xml(format!("attribute value '{raw}': {e}")))
}

/// Limits on a document's shape. Real Marketplace entries with their signature are
/// ~10 elements deep, a few hundred elements, a handful of namespaces; a hostile one must
/// not make the parser (or the recursive code working on its tree) use the stack or
/// memory without bound.
pub const MAX_DEPTH: usize = 64;
pub const MAX_ELEMENTS: usize = 10_000;
pub const MAX_ATTRIBUTES: usize = 64;
pub const MAX_NAMESPACE_DECLARATIONS: usize = 256;

/// The namespace declarations in scope: one stack for the whole document, each open
/// element's declarations pushed on top (and popped with it), the innermost winning.
#[derive(Default)]
struct NamespaceStack {
    declared: Vec<(String, String)>,
}

impl NamespaceStack {
    fn get(&self, prefix: &str) -> Option<&str> {
        self.declared
            .iter()
            .rev()
            .find(|(p, _)| p == prefix)
            .map(|(_, u)| u.as_str())
    }
}

/// Prefixes in scope and their URIs, as canonicalisation tracks them.
type Scope = BTreeMap<String, String>;

/// The URI of `prefix`, given what the scope binds it to.
fn resolve_prefix(bound: Option<&str>, prefix: &str, what: &str) -> Result<String> {
    if prefix == "xml" {
        return Ok(XML_NS.to_string());
    }
    match bound {
        Some(u) => Ok(u.to_owned()),
        None if prefix.is_empty() => Ok(String::new()),
        None => Err(Error::Xml(format!(
            "undeclared namespace prefix '{prefix}' in {what}"
        ))),
    }
}

/// Parse a document.
pub fn parse(input: &str) -> Result<Document> {
    let normalised = input.replace("\r\n", "\n").replace('\r', "\n");
    let mut reader = Reader::from_str(&normalised);
    reader.config_mut().expand_empty_elements = true;
    reader.config_mut().check_end_names = true;

    // Open elements, each with the height of the namespace stack below its declarations.
    let mut stack: Vec<(Element, usize)> = Vec::new();
    let mut scope = NamespaceStack::default();
    let mut elements = 0usize;
    let mut prolog = Vec::new();
    let mut epilog = Vec::new();
    let mut root: Option<Element> = None;

    fn push_node(
        stack: &mut [(Element, usize)],
        root: &Option<Element>,
        prolog: &mut Vec<Node>,
        epilog: &mut Vec<Node>,
        node: Node,
    ) -> Result<()> {
        if let Some((top, _)) = stack.last_mut() {
            if let (Node::Text(t), Some(Node::Text(prev))) = (&node, top.children.last_mut()) {
                prev.push_str(t);
            } else {
                top.children.push(node);
            }
            return Ok(());
        }
        match node {
            Node::Text(t) if t.chars().all(|c| matches!(c, ' ' | '\t' | '\n')) => Ok(()),
            Node::Text(t) => Err(Error::Xml(format!(
                "text outside the document element: '{}'",
                t.trim()
            ))),
            n if root.is_none() => {
                prolog.push(n);
                Ok(())
            }
            n => {
                epilog.push(n);
                Ok(())
            }
        }
    }

    loop {
        let ev = reader
            .read_event()
            .map_err(|e| Error::Xml(format!("at byte {}: {e}", reader.error_position())))?;
        match ev {
            Event::Start(s) => {
                if root.is_some() {
                    return Err(Error::Xml("more than one document element".into()));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(Error::Xml(format!(
                        "elements nested deeper than {MAX_DEPTH}"
                    )));
                }
                elements += 1;
                if elements > MAX_ELEMENTS {
                    return Err(Error::Xml(format!("more than {MAX_ELEMENTS} elements")));
                }
                let name = std::str::from_utf8(s.name().as_ref())
                    .map_err(xml_err)?
                    .to_string();
                check_qname(&name, "element")?;
                let mut attrs = Vec::new();
                for a in s.attributes().with_checks(true) {
                    let a = a.map_err(xml_err)?;
                    let key = std::str::from_utf8(a.key.as_ref())
                        .map_err(xml_err)?
                        .to_string();
                    check_qname(&key, "attribute")?;
                    let raw = std::str::from_utf8(&a.value).map_err(xml_err)?;
                    attrs.push((key, attr_value(raw)?));
                    if attrs.len() > MAX_ATTRIBUTES {
                        return Err(Error::Xml(format!(
                            "more than {MAX_ATTRIBUTES} attributes on <{name}>"
                        )));
                    }
                }
                let outer = scope.declared.len();
                let mut el = Element {
                    name,
                    ns: String::new(),
                    attrs,
                    children: Vec::new(),
                };
                for (p, u) in el.ns_decls() {
                    if p == "xml" || p == "xmlns" {
                        continue;
                    }
                    if u.is_empty() && !p.is_empty() {
                        return Err(Error::Xml(format!(
                            "prefix '{p}' undeclared with an empty URI on <{}>",
                            el.name
                        )));
                    }
                    if scope.declared.len() >= MAX_NAMESPACE_DECLARATIONS {
                        return Err(Error::Xml(format!(
                            "more than {MAX_NAMESPACE_DECLARATIONS} namespace declarations in scope"
                        )));
                    }
                    scope.declared.push((p.to_string(), u.to_string()));
                }
                el.ns = resolve_prefix(
                    scope.get(el.prefix()),
                    el.prefix(),
                    &format!("<{}>", el.name),
                )?;
                for (n, _) in &el.attrs {
                    let (p, _) = split_qname(n);
                    if !p.is_empty() && p != "xmlns" {
                        resolve_prefix(
                            scope.get(p),
                            p,
                            &format!("attribute {n} of <{}>", el.name),
                        )?;
                    }
                }
                stack.push((el, outer));
            }
            Event::End(_) => {
                let (el, outer) = stack
                    .pop()
                    .ok_or_else(|| Error::Xml("unbalanced end tag".into()))?;
                scope.declared.truncate(outer);
                if let Some((parent, _)) = stack.last_mut() {
                    parent.children.push(Node::Element(el));
                } else {
                    root = Some(el);
                }
            }
            Event::Empty(_) => unreachable!("expand_empty_elements is set"),
            Event::Text(t) => {
                let s = t.decode().map_err(xml_err)?.into_owned();
                push_node(&mut stack, &root, &mut prolog, &mut epilog, Node::Text(s))?;
            }
            Event::CData(t) => {
                let s = t.decode().map_err(xml_err)?.into_owned();
                if stack.is_empty() {
                    return Err(Error::Xml("CDATA outside the document element".into()));
                }
                push_node(&mut stack, &root, &mut prolog, &mut epilog, Node::Text(s))?;
            }
            Event::GeneralRef(r) => {
                let c = if r.is_char_ref() {
                    r.resolve_char_ref()
                        .map_err(xml_err)?
                        .ok_or_else(|| Error::Xml("bad character reference".into()))?
                } else {
                    match r.decode().map_err(xml_err)?.as_ref() {
                        "lt" => '<',
                        "gt" => '>',
                        "amp" => '&',
                        "apos" => '\'',
                        "quot" => '"',
                        other => return Err(Error::Xml(format!("undeclared entity '&{other};'"))),
                    }
                };
                push_node(
                    &mut stack,
                    &root,
                    &mut prolog,
                    &mut epilog,
                    Node::Text(c.to_string()),
                )?;
            }
            Event::Comment(c) => {
                let s = c.decode().map_err(xml_err)?.into_owned();
                push_node(
                    &mut stack,
                    &root,
                    &mut prolog,
                    &mut epilog,
                    Node::Comment(s),
                )?;
            }
            Event::PI(p) => {
                let target = std::str::from_utf8(p.target())
                    .map_err(xml_err)?
                    .to_string();
                check_qname(&target, "processing instruction")?;
                let content = std::str::from_utf8(p.content())
                    .map_err(xml_err)?
                    .trim_start()
                    .to_string();
                push_node(
                    &mut stack,
                    &root,
                    &mut prolog,
                    &mut epilog,
                    Node::Pi(target, content),
                )?;
            }
            Event::Decl(_) => {}
            Event::DocType(_) => return Err(Error::Xml("DTDs are not accepted".into())),
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(Error::Xml(format!(
            "unexpected end of document inside <{}>",
            stack.last().map(|(e, _)| e.name.as_str()).unwrap_or("")
        )));
    }
    let root = root.ok_or_else(|| Error::Xml("no document element".into()))?;
    Ok(Document {
        prolog,
        root,
        epilog,
    })
}

/// Escape text content for output (also used when writing documents).
pub fn escape_text(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\r' => out.push_str("&#xD;"),
            c => out.push(c),
        }
    }
}

/// Escape an attribute value for output between double quotes.
pub fn escape_attr(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '"' => out.push_str("&quot;"),
            '\t' => out.push_str("&#x9;"),
            '\n' => out.push_str("&#xA;"),
            '\r' => out.push_str("&#xD;"),
            c => out.push(c),
        }
    }
}

/// Canonicalisation algorithm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum C14nMethod {
    /// Canonical XML 1.0 (inclusive).
    Inclusive { with_comments: bool },
    /// Exclusive XML Canonicalization 1.0 with an InclusiveNamespaces prefix list
    /// (`#default` for the default namespace).
    Exclusive {
        with_comments: bool,
        inclusive_prefixes: Vec<String>,
    },
}

pub const C14N: &str = "http://www.w3.org/TR/2001/REC-xml-c14n-20010315";
pub const C14N_WITH_COMMENTS: &str = "http://www.w3.org/TR/2001/REC-xml-c14n-20010315#WithComments";
pub const EXC_C14N: &str = "http://www.w3.org/2001/10/xml-exc-c14n#";
pub const EXC_C14N_WITH_COMMENTS: &str = "http://www.w3.org/2001/10/xml-exc-c14n#WithComments";

impl C14nMethod {
    /// The method for an algorithm URI (the prefix list is filled in separately).
    pub fn from_uri(uri: &str) -> Option<C14nMethod> {
        match uri {
            C14N => Some(C14nMethod::Inclusive {
                with_comments: false,
            }),
            C14N_WITH_COMMENTS => Some(C14nMethod::Inclusive {
                with_comments: true,
            }),
            EXC_C14N => Some(C14nMethod::Exclusive {
                with_comments: false,
                inclusive_prefixes: Vec::new(),
            }),
            EXC_C14N_WITH_COMMENTS => Some(C14nMethod::Exclusive {
                with_comments: true,
                inclusive_prefixes: Vec::new(),
            }),
            _ => None,
        }
    }

    /// The algorithm URI.
    pub fn uri(&self) -> &'static str {
        match self {
            C14nMethod::Inclusive {
                with_comments: false,
            } => C14N,
            C14nMethod::Inclusive {
                with_comments: true,
            } => C14N_WITH_COMMENTS,
            C14nMethod::Exclusive {
                with_comments: false,
                ..
            } => EXC_C14N,
            C14nMethod::Exclusive {
                with_comments: true,
                ..
            } => EXC_C14N_WITH_COMMENTS,
        }
    }

    fn with_comments(&self) -> bool {
        match self {
            C14nMethod::Inclusive { with_comments } => *with_comments,
            C14nMethod::Exclusive { with_comments, .. } => *with_comments,
        }
    }
}

struct Canon<'a> {
    method: &'a C14nMethod,
    comments: bool,
    exclude: Option<&'a [usize]>,
    out: String,
}

/// Canonicalise the subtree at `apex` (a path of child indices from the document element;
/// empty = the whole document), leaving out the element at `exclude` (used for the
/// enveloped-signature transform). `keep_comments = false` drops comments even for a
/// "#WithComments" method (as for a same-document reference `URI=""`).
pub fn canonicalize(
    doc: &Document,
    apex: &[usize],
    exclude: Option<&[usize]>,
    method: &C14nMethod,
    keep_comments: bool,
) -> Result<String> {
    let mut c = Canon {
        method,
        comments: keep_comments && method.with_comments(),
        exclude,
        out: String::new(),
    };
    // Walk down to the apex, collecting the namespace scope and inherited xml:* attributes.
    let mut scope = Scope::new();
    let mut xml_attrs: BTreeMap<String, String> = BTreeMap::new();
    let mut el = &doc.root;
    let mut path = Vec::new();
    for i in apex {
        for (p, u) in el.ns_decls() {
            scope.insert(p.to_string(), u.to_string());
        }
        for (n, v) in &el.attrs {
            if n.starts_with("xml:") {
                xml_attrs.insert(n.clone(), v.clone());
            }
        }
        el = match el.children.get(*i) {
            Some(Node::Element(e)) => e,
            _ => return Err(Error::Xml(format!("no element at path {apex:?}"))),
        };
        path.push(*i);
    }
    if apex.is_empty() {
        for n in &doc.prolog {
            if c.misc(n) {
                c.out.push('\n');
            }
        }
        c.element(el, &mut path, &scope, &Scope::new(), None)?;
        for n in &doc.epilog {
            let before = c.out.len();
            c.out.push('\n');
            if !c.misc(n) {
                c.out.truncate(before);
            }
        }
    } else {
        let inherited = match method {
            C14nMethod::Inclusive { .. } => Some(xml_attrs),
            C14nMethod::Exclusive { .. } => None,
        };
        c.element(el, &mut path, &scope, &Scope::new(), inherited)?;
    }
    Ok(c.out)
}

impl Canon<'_> {
    /// Write a comment or PI outside the document element; false if nothing was written.
    fn misc(&mut self, n: &Node) -> bool {
        match n {
            Node::Comment(t) if self.comments => {
                self.out.push_str("<!--");
                self.out.push_str(t);
                self.out.push_str("-->");
                true
            }
            Node::Pi(t, d) => {
                self.pi(t, d);
                true
            }
            _ => false,
        }
    }

    fn pi(&mut self, target: &str, data: &str) {
        self.out.push_str("<?");
        self.out.push_str(target);
        if !data.is_empty() {
            self.out.push(' ');
            self.out.push_str(data);
        }
        self.out.push_str("?>");
    }

    fn element(
        &mut self,
        el: &Element,
        path: &mut Vec<usize>,
        parent_scope: &Scope,
        rendered: &Scope,
        inherited_xml: Option<BTreeMap<String, String>>,
    ) -> Result<()> {
        if self.exclude == Some(path.as_slice()) {
            return Ok(());
        }
        let mut scope = parent_scope.clone();
        for (p, u) in el.ns_decls() {
            scope.insert(p.to_string(), u.to_string());
        }
        // Namespace nodes to consider.
        let candidates: Vec<String> = match self.method {
            C14nMethod::Inclusive { .. } => {
                let mut v: Vec<String> = scope.keys().cloned().collect();
                if !v.iter().any(|p| p.is_empty()) {
                    v.push(String::new());
                }
                v
            }
            C14nMethod::Exclusive {
                inclusive_prefixes, ..
            } => {
                let mut v = vec![el.prefix().to_string()];
                for (n, _) in &el.attrs {
                    let (p, _) = split_qname(n);
                    if !p.is_empty() && p != "xmlns" && n != "xmlns" {
                        v.push(p.to_string());
                    }
                }
                for p in inclusive_prefixes {
                    v.push(if p == "#default" {
                        String::new()
                    } else {
                        p.clone()
                    });
                }
                v
            }
        };
        let mut ns_out: BTreeMap<String, String> = BTreeMap::new();
        for p in candidates {
            if p == "xml" {
                continue;
            }
            if p.is_empty() {
                let uri = scope.get("").map(String::as_str).unwrap_or("");
                let shown = rendered.get("").map(String::as_str).unwrap_or("");
                if uri != shown {
                    ns_out.insert(String::new(), uri.to_string());
                }
            } else if let Some(uri) = scope.get(&p) {
                if rendered.get(&p) != Some(uri) {
                    ns_out.insert(p, uri.clone());
                }
            }
        }
        let mut now_rendered = rendered.clone();
        for (p, u) in &ns_out {
            now_rendered.insert(p.clone(), u.clone());
        }
        // Attributes sorted by (namespace URI, local name); unqualified first.
        let mut attrs: Vec<(String, String, &str, &str)> = Vec::new();
        for (n, v) in &el.attrs {
            if n == "xmlns" || n.starts_with("xmlns:") {
                continue;
            }
            let (p, l) = split_qname(n);
            let uri = if p.is_empty() {
                String::new()
            } else {
                resolve_prefix(scope.get(p).map(String::as_str), p, n)?
            };
            attrs.push((uri, l.to_string(), n.as_str(), v.as_str()));
        }
        if let Some(inh) = &inherited_xml {
            for (n, v) in inh {
                if !el.attrs.iter().any(|(m, _)| m == n) {
                    attrs.push((
                        XML_NS.to_string(),
                        split_qname(n).1.to_string(),
                        n.as_str(),
                        v.as_str(),
                    ));
                }
            }
        }
        attrs.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));

        self.out.push('<');
        self.out.push_str(&el.name);
        for (p, u) in &ns_out {
            if p.is_empty() {
                self.out.push_str(" xmlns=\"");
            } else {
                self.out.push_str(" xmlns:");
                self.out.push_str(p);
                self.out.push_str("=\"");
            }
            escape_attr(u, &mut self.out);
            self.out.push('"');
        }
        for (_, _, n, v) in &attrs {
            self.out.push(' ');
            self.out.push_str(n);
            self.out.push_str("=\"");
            escape_attr(v, &mut self.out);
            self.out.push('"');
        }
        self.out.push('>');
        for (i, child) in el.children.iter().enumerate() {
            match child {
                Node::Element(e) => {
                    path.push(i);
                    self.element(e, path, &scope, &now_rendered, None)?;
                    path.pop();
                }
                Node::Text(t) => escape_text(t, &mut self.out),
                Node::Comment(t) => {
                    if self.comments {
                        self.out.push_str("<!--");
                        self.out.push_str(t);
                        self.out.push_str("-->");
                    }
                }
                Node::Pi(t, d) => self.pi(t, d),
            }
        }
        self.out.push_str("</");
        self.out.push_str(&el.name);
        self.out.push('>');
        Ok(())
    }
}

/// Find the first element `{ns}local` in document order; its path from the root.
pub fn find_path(root: &Element, ns: &str, local: &str) -> Option<Vec<usize>> {
    fn go(e: &Element, ns: &str, local: &str, path: &mut Vec<usize>) -> bool {
        for (i, c) in e.child_elements() {
            path.push(i);
            if c.is(ns, local) || go(c, ns, local, path) {
                return true;
            }
            path.pop();
        }
        false
    }
    if root.is(ns, local) {
        return Some(Vec::new());
    }
    let mut path = Vec::new();
    go(root, ns, local, &mut path).then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inc() -> C14nMethod {
        C14nMethod::Inclusive {
            with_comments: false,
        }
    }

    // Example 3.3 of the Canonical XML 1.0 recommendation (start and end tags).
    #[test]
    fn c14n_spec_example_start_end_tags() {
        let input = r#"<!DOCTYPE doc>"#;
        assert!(parse(input).is_err(), "DTDs are refused");
        let input = "<doc>\n   <e1   />\n   <e2   ></e2>\n   <e3   name = \"elem3\"   id=\"elem3\"   />\n   <e4   name=\"elem4\"   id=\"elem4\"   ></e4>\n   <e5 a:attr=\"out\" b:attr=\"sorted\" attr2=\"all\" attr=\"I'm\"\n      xmlns:b=\"http://www.ietf.org\"\n      xmlns:a=\"http://www.w3.org\"\n      xmlns=\"http://example.org\"/>\n   <e6 xmlns=\"\" xmlns:a=\"http://www.w3.org\">\n      <e7 xmlns=\"http://www.ietf.org\">\n         <e8 xmlns=\"\" xmlns:a=\"http://www.w3.org\">\n            <e9 xmlns=\"\" xmlns:a=\"http://www.ietf.org\"/>\n         </e8>\n      </e7>\n   </e6>\n</doc>";
        let expected = "<doc>\n   <e1></e1>\n   <e2></e2>\n   <e3 id=\"elem3\" name=\"elem3\"></e3>\n   <e4 id=\"elem4\" name=\"elem4\"></e4>\n   <e5 xmlns=\"http://example.org\" xmlns:a=\"http://www.w3.org\" xmlns:b=\"http://www.ietf.org\" attr=\"I'm\" attr2=\"all\" b:attr=\"sorted\" a:attr=\"out\"></e5>\n   <e6 xmlns:a=\"http://www.w3.org\">\n      <e7 xmlns=\"http://www.ietf.org\">\n         <e8 xmlns=\"\">\n            <e9 xmlns:a=\"http://www.ietf.org\"></e9>\n         </e8>\n      </e7>\n   </e6>\n</doc>";
        let doc = parse(input).unwrap();
        assert_eq!(
            canonicalize(&doc, &[], None, &inc(), false).unwrap(),
            expected
        );
    }

    // Example 3.4 (character modifications), without the DTD-dependent parts.
    #[test]
    fn c14n_text_and_attribute_escaping() {
        let input = "<doc>\r\n<text>First line&#x0d;&#10;Second line</text>\n<value>&#x32;</value>\n<compute><![CDATA[value>\"0\" && value<\"10\" ?\"valid\":\"error\"]]></compute>\n<compute expr='value>\"0\" &amp;&amp; value&lt;\"10\" ?\"valid\":\"error\"'>valid</compute>\n<norm attr=' &apos;   &#x20;&#13;&#xa;&#9;   &apos; '/>\n</doc>";
        let expected = "<doc>\n<text>First line&#xD;\nSecond line</text>\n<value>2</value>\n<compute>value&gt;\"0\" &amp;&amp; value&lt;\"10\" ?\"valid\":\"error\"</compute>\n<compute expr=\"value>&quot;0&quot; &amp;&amp; value&lt;&quot;10&quot; ?&quot;valid&quot;:&quot;error&quot;\">valid</compute>\n<norm attr=\" '    &#xD;&#xA;&#x9;   ' \"></norm>\n</doc>";
        let doc = parse(input).unwrap();
        assert_eq!(
            canonicalize(&doc, &[], None, &inc(), false).unwrap(),
            expected
        );
    }

    #[test]
    fn comments_pis_and_subsets() {
        let input = "<?xml version=\"1.0\"?>\n<?pi  data ?>\n<!--c1-->\n<r xmlns:a=\"urn:a\" xml:base=\"http://b/\"><!--in--><a:x y=\"1\"><z/></a:x></r>\n<!--c2-->";
        let doc = parse(input).unwrap();
        assert_eq!(
            canonicalize(&doc, &[], None, &inc(), false).unwrap(),
            "<?pi data ?>\n<r xmlns:a=\"urn:a\" xml:base=\"http://b/\"><a:x y=\"1\"><z></z></a:x></r>"
        );
        let with = C14nMethod::Inclusive {
            with_comments: true,
        };
        assert_eq!(
            canonicalize(&doc, &[], None, &with, true).unwrap(),
            "<?pi data ?>\n<!--c1-->\n<r xmlns:a=\"urn:a\" xml:base=\"http://b/\"><!--in--><a:x y=\"1\"><z></z></a:x></r>\n<!--c2-->"
        );
        // Inclusive subset: ancestor namespaces and xml:* attributes are carried over.
        assert_eq!(
            canonicalize(&doc, &[1], None, &inc(), false).unwrap(),
            "<a:x xmlns:a=\"urn:a\" y=\"1\" xml:base=\"http://b/\"><z></z></a:x>"
        );
        let exc = C14nMethod::Exclusive {
            with_comments: false,
            inclusive_prefixes: vec![],
        };
        assert_eq!(
            canonicalize(&doc, &[1], None, &exc, false).unwrap(),
            "<a:x xmlns:a=\"urn:a\" y=\"1\"><z></z></a:x>"
        );
        // Exclusion (enveloped transform).
        assert_eq!(
            canonicalize(&doc, &[], Some(&[1]), &inc(), false).unwrap(),
            "<?pi data ?>\n<r xmlns:a=\"urn:a\" xml:base=\"http://b/\"></r>"
        );
    }

    #[test]
    fn exclusive_renders_only_used_namespaces() {
        let doc =
            parse("<a:r xmlns:a=\"urn:a\" xmlns:b=\"urn:b\" xmlns=\"urn:d\"><c b:q=\"1\"/></a:r>")
                .unwrap();
        let exc = C14nMethod::Exclusive {
            with_comments: false,
            inclusive_prefixes: vec![],
        };
        assert_eq!(
            canonicalize(&doc, &[], None, &exc, false).unwrap(),
            "<a:r xmlns:a=\"urn:a\"><c xmlns=\"urn:d\" xmlns:b=\"urn:b\" b:q=\"1\"></c></a:r>"
        );
    }

    #[test]
    fn parse_errors_are_reported() {
        assert!(parse("<a><b></a>").is_err());
        assert!(parse("<a>&foo;</a>").is_err());
        assert!(parse("<p:a/>").is_err());
        assert!(parse("<a/><b/>").is_err());
    }

    // Found by fuzzing (fuzz/fuzz_targets/marketplace_xml.rs): `<$//>` parsed as an element
    // named `$/`, and its canonical form did not parse again.
    #[test]
    fn names_that_are_not_xml_names_are_refused() {
        assert!(error_of("<$//>").contains("'$/' is not a valid XML element name"));
        assert!(error_of("<a 1b=\"v\"/>").contains("'1b' is not a valid XML attribute name"));
        assert!(parse("<?$ x?><a/>").is_err());
        for bad in [
            "<:a/>",
            "<a:/>",
            "<a:b:c xmlns:a=\"urn:a\"/>",
            "<-a/>",
            "<a\u{2}/>",
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
        for good in [
            "<a.b-c_d/>",
            "<_x/>",
            "<\u{e9}t\u{e9}/>",
            "<p:a xmlns:p=\"urn:p\" p:b-1=\"v\"/>",
        ] {
            assert!(parse(good).is_ok(), "{good} was refused");
        }
    }

    fn error_of(input: &str) -> String {
        match parse(input) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    // A review's attack: 20 000 nested elements in 140 KB overflowed the stack (the tree's
    // recursive drop, find_path) and took the whole Marketplace server down.
    #[test]
    fn a_deeply_nested_document_is_refused_not_a_crash() {
        let deep = format!("{}{}", "<a>".repeat(20_000), "</a>".repeat(20_000));
        assert!(deep.len() < 150_000);
        assert!(error_of(&deep).contains("nested deeper than 64"));
        // Right at the limit it is an ordinary document.
        let ok = format!("{}{}", "<a>".repeat(MAX_DEPTH), "</a>".repeat(MAX_DEPTH));
        let doc = parse(&ok).unwrap();
        assert_eq!(find_path(&doc.root, "", "b"), None);
    }

    // The other attack: a thousand xmlns declarations deep down made every element copy
    // the whole namespace map (~900 MB for 57 KB). Declarations in scope are now capped,
    // and the scope is one stack, not a copy per element.
    #[test]
    fn namespace_declarations_are_bounded() {
        let decls: String = (0..1000)
            .map(|i| format!(" xmlns:p{i}=\"urn:{i}\""))
            .collect();
        let input = format!("<r{decls}>{}{}</r>", "<a>".repeat(50), "</a>".repeat(50));
        assert!(error_of(&input).contains("more than 64 attributes"));
        // Spread over the levels, capped in total.
        let spread: String = (0..MAX_DEPTH)
            .map(|i| {
                let d: String = (0..5)
                    .map(|j| format!(" xmlns:q{j}=\"urn:{i}:{j}\""))
                    .collect();
                format!("<a{d}>")
            })
            .collect();
        let input = format!("{spread}{}", "</a>".repeat(MAX_DEPTH));
        assert!(error_of(&input).contains("namespace declarations"));
        // Popped with their element: 20 siblings declaring 60 each (1200 in all) parse.
        let one: String = (0..60)
            .map(|j| format!(" xmlns:s{j}=\"urn:{j}\""))
            .collect();
        let siblings = format!("<r>{}</r>", format!("<s0:e{one}/>").repeat(20));
        let doc = parse(&siblings).unwrap();
        assert_eq!(doc.root.children.len(), 20);
        let Node::Element(first) = &doc.root.children[0] else {
            panic!("not an element")
        };
        assert_eq!(first.ns, "urn:0");
    }

    #[test]
    fn element_and_attribute_counts_are_bounded() {
        let many = format!("<r>{}</r>", "<e/>".repeat(MAX_ELEMENTS));
        assert!(error_of(&many).contains("more than 10000 elements"));
        let fine = format!("<r>{}</r>", "<e/>".repeat(MAX_ELEMENTS - 1));
        assert!(parse(&fine).is_ok());
        let attrs: String = (0..=MAX_ATTRIBUTES)
            .map(|i| format!(" a{i}=\"v\""))
            .collect();
        assert!(error_of(&format!("<r{attrs}/>")).contains("more than 64 attributes"));
    }
}
