//! Generates the task's code from the validated model.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Item, ItemFn};

use crate::attr::{self, TaskArgs};
use crate::ctxt::Ctxt;
use crate::model::{self, Output, Param, Role, Shape, TaskFn};

pub(crate) fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut func = match parse_fn(&item) {
        Ok(func) => func,
        Err(error) => {
            // Keep the item, so that the one error is the only one.
            let error = error.into_compile_error();
            return quote! { #item #error };
        }
    };
    let mut cx = Ctxt::default();
    let args = attr::parse(&mut cx, attr);
    let model = model::analyze(&mut cx, &mut func);
    match (cx.check(), model) {
        (Ok(()), Some(model)) => expand(&func, &args, &model),
        (Err(error), _) => {
            // Keep the function, so that its other uses still type-check and IDEs keep working.
            let error = error.into_compile_error();
            quote! { #func #error }
        }
        (Ok(()), None) => quote! { #func },
    }
}

fn expand(func: &ItemFn, args: &TaskArgs, task: &TaskFn) -> TokenStream {
    let krate = match &args.krate {
        Some(path) => quote!(#path),
        None => quote!(::machinery),
    };
    let private = quote!(#krate::__private);
    let ident = &task.ident;
    let vis = &task.vis;
    let name = match &args.name {
        Some(name) => name.value(),
        None => ident.to_string(),
    };

    let out_ty = output_type(&task.output.shape);
    let kind = kind_type(&krate, &task.params);
    let builder = builder(&krate, task, &out_ty, &kind);
    let runner = runner(&krate, task);
    let runner_kind = if task.asyncness.is_some() {
        quote!(Async)
    } else {
        quote!(Blocking)
    };
    let options = args.options.to_tokens(&private);
    let doc = format!(
        "The task `{name}`: its typed signature builder. The function itself is [`{ident}()`](fn@{ident})."
    );

    quote! {
        #func

        #[doc = #doc]
        #[allow(non_camel_case_types)]
        #vis enum #ident {}

        impl #ident {
            /// The task's name on the wire.
            #vis const NAME: &'static ::core::primitive::str = #name;

            /// The task's default options, from its `#[task(..)]` attribute.
            #vis const OPTIONS: #private::TaskOptions = #options;

            #builder
        }

        const _: () = {
            #runner

            #private::inventory::submit! {
                #private::TaskDescriptor {
                    name: #name,
                    path: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#ident)),
                    location: ::core::concat!(::core::file!(), ":", ::core::line!()),
                    runner: #private::Runner::#runner_kind(__machinery_run),
                    options: #ident::OPTIONS,
                }
            }
        };
    }
}

fn output_type(shape: &Shape) -> TokenStream {
    match shape {
        Shape::Unit => quote!(()),
        Shape::Single(ty) => quote!(#ty),
        Shape::Tuple(tys) => quote!((#(#tys,)*)),
    }
}

fn kind_type(krate: &TokenStream, params: &[Param]) -> TokenStream {
    for param in params {
        let ty = &param.ty;
        match &param.role {
            Role::Chained => return quote!(#krate::Needs<#ty>),
            Role::Variadic(elem) => return quote!(#krate::Variadic<#elem>),
            Role::ErrorMessage => return quote!(#krate::ErrorHandler),
            Role::Plain => {}
        }
    }
    quote!(#krate::Full)
}

/// `name::signature(..)`: the parameters a producer gives (all but the chained input and the
/// error message), encoded in order.
fn builder(
    krate: &TokenStream,
    task: &TaskFn,
    out_ty: &TokenStream,
    kind: &TokenStream,
) -> TokenStream {
    let private = quote!(#krate::__private);
    let vis = &task.vis;
    let given: Vec<&Param> = task
        .params
        .iter()
        .filter(|p| matches!(p.role, Role::Plain | Role::Variadic(_)))
        .collect();
    let decls = given.iter().map(|p| {
        let (ident, ty) = (&p.ident, &p.ty);
        quote!(#ident: #ty)
    });
    // The encoder is named with the parameter's type, at its span: a type that cannot be
    // encoded is reported there, once.
    let pushes = given.iter().map(|p| {
        let ident = &p.ident;
        let label = ident.to_string();
        let encode = match &p.role {
            Role::Variadic(elem) => {
                quote_spanned!(elem.span()=> #private::SignatureBuilder::args::<#elem>)
            }
            _ => {
                let ty = &p.ty;
                quote_spanned!(ty.span()=> #private::SignatureBuilder::arg::<#ty>)
            }
        };
        quote!(#encode(&mut __machinery_builder, #label, &#ident);)
    });
    let capacity = task.params.len();
    let decode = decoder(&private, &task.output);
    let doc = match &task.params.iter().find(|p| !matches!(p.role, Role::Plain)) {
        Some(Param {
            role: Role::Chained,
            ..
        }) => "A signature of this task, to use as a chain link: the previous task's result becomes its last argument.",
        Some(Param {
            role: Role::Variadic(_),
            ..
        }) => "A signature of this task; in a chain, the previous task's result is appended to its arguments.",
        Some(Param {
            role: Role::ErrorMessage,
            ..
        }) => "A signature of this task, to use as an error callback with `on_error`.",
        _ => "A signature of this task, ready to send.",
    };
    quote! {
        #[doc = #doc]
        #[allow(clippy::too_many_arguments, clippy::needless_pass_by_value)]
        #vis fn signature(#(#decls),*) -> #krate::Signature<#out_ty, #kind> {
            #decode
            let mut __machinery_builder = #private::SignatureBuilder::new(Self::NAME, #capacity, &Self::OPTIONS);
            #(#pushes)*
            __machinery_builder.finish(__machinery_decode)
        }
    }
}

/// `__machinery_decode`: the result types are named at their spans, so that a type that cannot
/// be decoded is reported there.
fn decoder(private: &TokenStream, output: &Output) -> TokenStream {
    let body = match &output.shape {
        Shape::Unit => quote!(#private::decode_unit(__machinery_results)),
        Shape::Single(ty) => {
            let decode = quote_spanned!(ty.span()=> #private::decode_one::<#ty>);
            quote!(#decode(__machinery_results))
        }
        Shape::Tuple(tys) => {
            let count = tys.len();
            let items = tys.iter().enumerate().map(|(i, ty)| {
                let decode = quote_spanned!(ty.span()=> #private::decode_nth::<#ty>);
                quote!(#decode(__machinery_results, #i, #count)?)
            });
            quote!(::core::result::Result::Ok((#(#items,)*)))
        }
    };
    let out_ty = output_type(&output.shape);
    quote! {
        fn __machinery_decode(
            __machinery_results: &[#private::TaskResult],
        ) -> ::core::result::Result<#out_ty, #private::Error> {
            #body
        }
    }
}

/// `__machinery_run`: decodes the args, calls the function, encodes its results.
///
/// Each trait bound on a user's type is required in exactly one place, named with the type at
/// its span (`Serialize` on arguments by the builder, `DeserializeOwned` by the reader here;
/// the reverse for results), so a type that cannot travel gets one error per missing trait,
/// pointing at the type.
fn runner(krate: &TokenStream, task: &TaskFn) -> TokenStream {
    let private = quote!(#krate::__private);
    let ident = &task.ident;
    let variadic = task
        .params
        .iter()
        .any(|p| matches!(p.role, Role::Variadic(_)));
    let fixed = task.params.len() - usize::from(variadic);
    let names: Vec<_> = task
        .params
        .iter()
        .map(|p| format_ident!("__machinery_arg_{}", p.ident))
        .collect();
    let reads = task.params.iter().zip(&names).map(|(p, local)| {
        let ty = &p.ty;
        let label = p.ident.to_string();
        let read = match &p.role {
            Role::Variadic(elem) => {
                quote_spanned!(elem.span()=> #private::ArgReader::rest::<#elem>)
            }
            _ => quote_spanned!(ty.span()=> #private::ArgReader::next::<#ty>),
        };
        let read = quote!(#read(&mut __machinery_reader, #label));
        quote! {
            let #local: #ty = match #read {
                ::core::result::Result::Ok(value) => value,
                ::core::result::Result::Err(error) => return __machinery_fail(error),
            };
        }
    });
    let pack = pack(&private, &task.output, task.return_type.as_ref());
    let (ret, call, fail) = if let Some(asyncness) = &task.asyncness {
        // The future and the call that requires it to be `Send` are spanned at the function's
        // `async`: a body that is not `Send` is reported there, not at `#[task]`.
        let boxed = quote_spanned!(asyncness.span=> __machinery_boxed(async move {
            __machinery_pack(#ident(#(#names),*).await)
        }));
        (
            quote!(#private::TaskFuture),
            quote! {
                use #private::boxed as __machinery_boxed;
                #boxed
            },
            quote!(#private::ready(::core::result::Result::Err(error))),
        )
    } else {
        (
            quote!(#private::TaskOutcome),
            quote!(__machinery_pack(#ident(#(#names),*))),
            quote!(::core::result::Result::Err(error)),
        )
    };
    let pack_input = pack_input_type(task);
    quote! {
        fn __machinery_pack(__machinery_ret: #pack_input) -> #private::TaskOutcome {
            #pack
        }

        fn __machinery_fail(error: #private::TaskError) -> #ret {
            #fail
        }

        fn __machinery_run(
            __machinery_args: ::std::vec::Vec<#private::Arg>,
        ) -> #ret {
            let mut __machinery_reader = match #private::ArgReader::new(
                #ident::NAME,
                __machinery_args,
                #fixed,
                #variadic,
            ) {
                ::core::result::Result::Ok(reader) => reader,
                ::core::result::Result::Err(error) => return __machinery_fail(error),
            };
            #(#reads)*
            #call
        }
    }
}

/// The function's declared return type, as `__machinery_pack` takes it.
fn pack_input_type(task: &TaskFn) -> TokenStream {
    match &task.return_type {
        Some(ty) => quote!(#ty),
        None => quote!(()),
    }
}

/// Turns the returned value into task results. The error and result types are named at their
/// spans, so that one that does not fit is reported there.
fn pack(private: &TokenStream, output: &Output, return_type: Option<&syn::Type>) -> TokenStream {
    let unwrap = if output.fallible {
        let task_error = match (&output.error, return_type) {
            (Some(error), _) => quote_spanned!(error.span()=> #private::task_error::<#error>),
            (None, Some(ret)) => quote_spanned!(ret.span()=> #private::task_error),
            (None, None) => quote!(#private::task_error),
        };
        quote! {
            let __machinery_value = match __machinery_ret {
                ::core::result::Result::Ok(value) => value,
                ::core::result::Result::Err(error) => {
                    return ::core::result::Result::Err(#task_error(error));
                }
            };
        }
    } else {
        quote!(let __machinery_value = __machinery_ret;)
    };
    let encode = |value: TokenStream, ty: &syn::Type| {
        let encode = quote_spanned!(ty.span()=> #private::encode_result::<#ty>);
        quote!(#encode(&#value)?)
    };
    let results = match &output.shape {
        Shape::Unit => quote! {
            let () = __machinery_value;
            ::core::result::Result::Ok(::std::vec::Vec::new())
        },
        Shape::Single(ty) => {
            let item = encode(quote!(__machinery_value), ty);
            quote!(::core::result::Result::Ok(::std::vec![#item]))
        }
        Shape::Tuple(tys) => {
            let locals: Vec<_> = (0..tys.len())
                .map(|i| format_ident!("__machinery_result_{}", i))
                .collect();
            let items = locals.iter().zip(tys).map(|(l, ty)| encode(quote!(#l), ty));
            quote! {
                let (#(#locals,)*) = __machinery_value;
                ::core::result::Result::Ok(::std::vec![#(#items),*])
            }
        }
    };
    quote! {
        #unwrap
        #results
    }
}

/// The function under `#[task]`, or one error at the item that is not one.
fn parse_fn(item: &TokenStream) -> syn::Result<ItemFn> {
    const EXPECTED: &str = "`#[task]` applies to functions: `fn name(args..) -> T { .. }`";
    let other = match syn::parse2::<Item>(item.clone()) {
        Ok(Item::Fn(func)) => return Ok(func),
        Ok(other) => other,
        Err(e) => {
            let mut error = syn::Error::new(Span::call_site(), EXPECTED);
            error.combine(e);
            return Err(error);
        }
    };
    // The keyword and name of the item, to point at.
    let found = match &other {
        Item::Struct(syn::ItemStruct {
            struct_token,
            ident,
            ..
        }) => Some(("a struct", quote!(#struct_token #ident))),
        Item::Enum(syn::ItemEnum {
            enum_token, ident, ..
        }) => Some(("an enum", quote!(#enum_token #ident))),
        Item::Union(syn::ItemUnion {
            union_token, ident, ..
        }) => Some(("a union", quote!(#union_token #ident))),
        Item::Trait(syn::ItemTrait {
            trait_token, ident, ..
        }) => Some(("a trait", quote!(#trait_token #ident))),
        Item::Impl(syn::ItemImpl { impl_token, .. }) => {
            Some(("an `impl` block", quote!(#impl_token)))
        }
        Item::Mod(syn::ItemMod {
            mod_token, ident, ..
        }) => Some(("a module", quote!(#mod_token #ident))),
        Item::Const(syn::ItemConst {
            const_token, ident, ..
        }) => Some(("a constant", quote!(#const_token #ident))),
        Item::Static(syn::ItemStatic {
            static_token,
            ident,
            ..
        }) => Some(("a static", quote!(#static_token #ident))),
        Item::Type(syn::ItemType {
            type_token, ident, ..
        }) => Some(("a type alias", quote!(#type_token #ident))),
        Item::Use(syn::ItemUse { use_token, .. }) => {
            Some(("a `use` declaration", quote!(#use_token)))
        }
        _ => None,
    };
    match found {
        Some((kind, head)) => Err(syn::Error::new_spanned(
            head,
            format!(
                "`#[task]` applies to functions (`fn name(args..) -> T {{ .. }}`), not to {kind}"
            ),
        )),
        // A bodiless `fn f();`, a macro call, ..: the parser says what is wrong.
        None => match syn::parse2::<ItemFn>(item.clone()) {
            Ok(func) => Ok(func),
            Err(e) => {
                let mut error = syn::Error::new(Span::call_site(), EXPECTED);
                error.combine(e);
                Err(error)
            }
        },
    }
}
