//! Checks the function and builds the model the expansion works from.

use syn::{FnArg, GenericArgument, ItemFn, Pat, PathArguments, ReturnType, Type};

use crate::ctxt::Ctxt;

/// A validated task function.
pub(crate) struct TaskFn {
    pub(crate) ident: syn::Ident,
    pub(crate) vis: syn::Visibility,
    /// The `async` keyword of an async task.
    pub(crate) asyncness: Option<syn::Token![async]>,
    pub(crate) params: Vec<Param>,
    pub(crate) output: Output,
    /// The declared return type (`None` for none).
    pub(crate) return_type: Option<Type>,
}

pub(crate) struct Param {
    pub(crate) ident: syn::Ident,
    pub(crate) ty: Type,
    pub(crate) role: Role,
}

#[derive(Clone)]
pub(crate) enum Role {
    Plain,
    /// Receives the previous task's result.
    Chained,
    /// `Vec<T>` collecting the remaining arguments; holds `T`.
    Variadic(Box<Type>),
    /// Receives the error message of a failed task.
    ErrorMessage,
}

pub(crate) struct Output {
    /// `Result<T, E>`: `Err` is a task failure.
    pub(crate) fallible: bool,
    /// `E` in `Result<T, E>`, when spelled (a `Result<T>` alias hides it).
    pub(crate) error: Option<Type>,
    pub(crate) shape: Shape,
}

pub(crate) enum Shape {
    Unit,
    Single(Type),
    Tuple(Vec<Type>),
}

const PARAM_ATTRS: &str = "`#[chained]`, `#[variadic]` or `#[error_message]`";

/// Reads our parameter attributes off `func` (they are not real attributes and must not reach
/// the compiler) and checks everything; errors go to `cx`.
pub(crate) fn analyze(cx: &mut Ctxt, func: &mut ItemFn) -> Option<TaskFn> {
    let sig = &mut func.sig;
    if !sig.generics.params.is_empty() {
        cx.error_spanned_by(
            &sig.generics,
            "a task cannot be generic: a worker must know the concrete type of every argument",
        );
    }
    if let Some(where_clause) = &sig.generics.where_clause {
        cx.error_spanned_by(where_clause, "a task cannot have a `where` clause");
    }
    if let Some(unsafety) = &sig.unsafety {
        cx.error_spanned_by(unsafety, "a task cannot be an `unsafe fn`");
    }
    if let Some(abi) = &sig.abi {
        cx.error_spanned_by(abi, "a task cannot have an `extern` ABI");
    }
    if let Some(variadic) = &sig.variadic {
        cx.error_spanned_by(
            variadic,
            "C variadics are not supported; use `#[variadic] args: Vec<T>`",
        );
    }

    let count = sig.inputs.len();
    let mut params = Vec::with_capacity(count);
    for (index, input) in sig.inputs.iter_mut().enumerate() {
        let typed = match input {
            FnArg::Receiver(receiver) => {
                cx.error_spanned_by(
                    &*receiver,
                    "`#[task]` applies to free functions, not methods: a task cannot take `self`",
                );
                continue;
            }
            FnArg::Typed(typed) => typed,
        };
        let role = take_role(cx, &mut typed.attrs);
        let ident = match &*typed.pat {
            Pat::Ident(pat) if pat.by_ref.is_none() && pat.subpat.is_none() => pat.ident.clone(),
            other => {
                cx.error_spanned_by(
                    other,
                    "task parameters must be plain names (`x: T`); destructuring patterns are not supported",
                );
                continue;
            }
        };
        check_type(cx, &typed.ty);
        let last = index + 1 == count;
        let role = match role {
            Some((role, attr)) => match role {
                Role::Chained | Role::Variadic(_) if !last => {
                    cx.error_spanned_by(
                        &attr,
                        format!("`{}` can only mark the last parameter", attr_name(&attr)),
                    );
                    Role::Plain
                }
                Role::ErrorMessage if index != 0 => {
                    cx.error_spanned_by(
                        &attr,
                        "`#[error_message]` can only mark the first parameter",
                    );
                    Role::Plain
                }
                Role::ErrorMessage if !is_string(&typed.ty) => {
                    cx.error_spanned_by(
                        &typed.ty,
                        "an `#[error_message]` parameter must be a `String`",
                    );
                    Role::Plain
                }
                Role::Variadic(_) => match vec_element(&typed.ty) {
                    Some(elem) => Role::Variadic(Box::new(elem)),
                    None => {
                        cx.error_spanned_by(
                            &typed.ty,
                            "a `#[variadic]` parameter must be a `Vec<T>`",
                        );
                        Role::Plain
                    }
                },
                role => role,
            },
            None => Role::Plain,
        };
        params.push(Param {
            ident,
            ty: (*typed.ty).clone(),
            role,
        });
    }

    let error_handler = params.iter().any(|p| matches!(p.role, Role::ErrorMessage));
    let input = params
        .iter()
        .find(|p| matches!(p.role, Role::Chained | Role::Variadic(_)));
    if let (true, Some(input)) = (error_handler, input) {
        cx.error_spanned_by(
            &input.ident,
            "an `#[error_message]` task cannot also take a chained input",
        );
    }

    let output = match &sig.output {
        ReturnType::Default => Output {
            fallible: false,
            error: None,
            shape: Shape::Unit,
        },
        ReturnType::Type(_, ty) => classify_output(cx, ty),
    };

    Some(TaskFn {
        ident: sig.ident.clone(),
        vis: func.vis.clone(),
        asyncness: sig.asyncness,
        params,
        output,
        return_type: match &sig.output {
            ReturnType::Default => None,
            ReturnType::Type(_, ty) => Some((**ty).clone()),
        },
    })
}

fn attr_name(attr: &syn::Attribute) -> String {
    let path = attr.path();
    let name = path
        .get_ident()
        .map(ToString::to_string)
        .unwrap_or_default();
    format!("#[{name}]")
}

/// Removes our attributes from a parameter and returns its role; any other attribute is an
/// error (it would shift the positional arguments or be silently ignored).
fn take_role(cx: &mut Ctxt, attrs: &mut Vec<syn::Attribute>) -> Option<(Role, syn::Attribute)> {
    let mut role: Option<(Role, syn::Attribute)> = None;
    for attr in std::mem::take(attrs) {
        let this = if attr.path().is_ident("chained") {
            Role::Chained
        } else if attr.path().is_ident("variadic") {
            Role::Variadic(Box::new(Type::Verbatim(Default::default())))
        } else if attr.path().is_ident("error_message") {
            Role::ErrorMessage
        } else {
            cx.error_spanned_by(
                &attr,
                format!("unsupported attribute on a task parameter; expected {PARAM_ATTRS}"),
            );
            continue;
        };
        if !matches!(attr.meta, syn::Meta::Path(_)) {
            cx.error_spanned_by(&attr, format!("`{}` takes no arguments", attr_name(&attr)));
            continue;
        }
        if role.is_some() {
            cx.error_spanned_by(
                &attr,
                format!("a parameter can have only one of {PARAM_ATTRS}"),
            );
            continue;
        }
        role = Some((this, attr));
    }
    role
}

/// Rejects types that can never be task arguments, with a hint.
fn check_type(cx: &mut Ctxt, ty: &Type) {
    match ty {
        Type::Reference(r) => cx.error_spanned_by(
            r,
            "task arguments are decoded from the message and must be owned: use `String` for `&str`, `Vec<T>` for `&[T]`",
        ),
        Type::ImplTrait(t) => cx.error_spanned_by(
            t,
            "`impl Trait` cannot be a task argument: use a concrete type",
        ),
        Type::Infer(t) => cx.error_spanned_by(t, "task arguments need a concrete type"),
        Type::Paren(p) => check_type(cx, &p.elem),
        _ => {}
    }
}

fn classify_output(cx: &mut Ctxt, ty: &Type) -> Output {
    if let Some((ok, error)) = result_types(ty) {
        return Output {
            fallible: true,
            error: error.cloned(),
            shape: shape(cx, ok),
        };
    }
    Output {
        fallible: false,
        error: None,
        shape: shape(cx, ty),
    }
}

fn shape(cx: &mut Ctxt, ty: &Type) -> Shape {
    match ty {
        Type::Paren(p) => shape(cx, &p.elem),
        Type::Tuple(t) if t.elems.is_empty() => Shape::Unit,
        Type::Tuple(t) => Shape::Tuple(t.elems.iter().cloned().collect()),
        Type::ImplTrait(t) => {
            cx.error_spanned_by(t, "a task must return a concrete type, not `impl Trait`");
            Shape::Unit
        }
        Type::Reference(r) => {
            cx.error_spanned_by(r, "a task must return an owned value, not a reference");
            Shape::Unit
        }
        other => Shape::Single(other.clone()),
    }
}

/// `T` and, when spelled, `E` in `Result<T, E>` (any path ending in `Result`).
fn result_types(ty: &Type) -> Option<(&Type, Option<&Type>)> {
    let Type::Path(path) = ty else { return None };
    if path.qself.is_some() {
        return None;
    }
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let mut types = args.args.iter().filter_map(|arg| match arg {
        GenericArgument::Type(t) => Some(t),
        _ => None,
    });
    let ok = types.next()?;
    Some((ok, types.next()))
}

/// `T` in `Vec<T>` (any path ending in `Vec`).
fn vec_element(ty: &Type) -> Option<Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Vec" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        GenericArgument::Type(t) if args.args.len() == 1 => Some(t.clone()),
        _ => None,
    }
}

fn is_string(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_none()
        && p.path.segments.last().is_some_and(|s| s.ident == "String" && s.arguments.is_none()))
}
