"""The inventory's HTTP front: the catalogue (public), stock levels and reservations (staff)."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from bus.web import TRANSACTIONS, Api, Conflict, NotFound, Page, json_response, page_params
from inventory_svc import domain, store
from inventory_svc.domain import ReservationStatus
from inventory_svc.messages import ProductCreated, ProductId, ProductUpdated, StockRestocked

# set by app.build: how long a reservation holds its units
RESERVATION_TTL = web.AppKey("RESERVATION_TTL", float)
STAFF = ("admin", "manager")

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Price = Annotated[Decimal, Field(gt=0, max_digits=12, decimal_places=2, examples=["1299.99"])]
Units = Annotated[int, Field(strict=True, ge=0, le=1_000_000_000)]

api = Api()


class NewProduct(BaseModel):
    """A product to add to the catalogue; ``id`` is a slug the creator chooses."""

    model_config = ConfigDict(extra="forbid")

    id: ProductId
    name: Name
    price: Price
    stock: Units


class ProductChanges(BaseModel):
    """A new name, a new price, or both."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    price: Price | None = None

    @model_validator(mode="after")
    def _changes_something(self) -> ProductChanges:
        if self.name is None and self.price is None:
            raise ValueError("give a name, a price or both")
        return self


class Restock(BaseModel):
    """Units that arrived."""

    model_config = ConfigDict(extra="forbid")

    quantity: Annotated[Units, Field(ge=1)]


class ProductView(BaseModel):
    """A product as the catalogue shows it."""

    id: str
    name: str
    price: Decimal
    stock: int
    reserved: int
    available: int

    @classmethod
    def of(cls, product: store.Product) -> ProductView:
        """The view of a stored product."""
        return cls(
            id=product.id,
            name=product.name,
            price=product.price,
            stock=product.stock,
            reserved=product.reserved,
            available=product.available,
        )


class StockView(BaseModel):
    """A product's stock counters."""

    id: str
    name: str
    stock: int
    reserved: int
    available: int
    sold: int


class ReservationItemView(BaseModel):
    """A held line (with its price), or for a rejected order a line that fell short."""

    product_id: str
    quantity: int
    unit_price: Decimal | None


class ReservationView(BaseModel):
    """An order's reservation."""

    order_id: str
    status: ReservationStatus
    items: list[ReservationItemView]
    total: Decimal | None
    reason: str | None
    created_at: datetime
    expires_at: datetime | None = Field(description="when an uncommitted reservation expires")


@api.get("/products", response=Page[ProductView])
async def list_products(request: web.Request) -> web.Response:
    """List the catalogue, by product id."""
    limit, offset = page_params(request)
    async with request.app[TRANSACTIONS].db.session() as session:
        found, total = await store.list_products(session, limit, offset)
    items = [ProductView.of(product) for product in found]
    return json_response(Page(items=items, total=total, limit=limit, offset=offset))


@api.get("/products/{product_id}", response=ProductView)
async def get_product(request: web.Request) -> web.Response:
    """One product with its price and stock."""
    product_id = request.match_info["product_id"]
    async with request.app[TRANSACTIONS].db.session() as session:
        product = await store.get_product(session, product_id)
    if product is None:
        raise NotFound(f"no product {product_id!r}")
    return json_response(ProductView.of(product))


@api.post("/products", body=NewProduct, response=ProductView, status=201, roles=STAFF)
async def create_product(request: web.Request, body: NewProduct) -> web.Response:
    """Add a product to the catalogue."""
    price = domain.money(body.price)
    async with request.app[TRANSACTIONS].begin() as unit:
        product = await store.add_product(
            unit.session, body.id, body.name, price, body.stock, store.utc_now()
        )
        if product is None:
            raise Conflict(f"product {body.id!r} already exists")
        unit.publish(
            ProductCreated(product_id=product.id, name=product.name, price=price, stock=body.stock)
        )
    location = {"Location": f"/products/{product.id}"}
    return json_response(ProductView.of(product), status=201, headers=location)


@api.put("/products/{product_id}", body=ProductChanges, response=ProductView, roles=STAFF)
async def update_product(request: web.Request, body: ProductChanges) -> web.Response:
    """Rename or reprice a product; reservations already made keep their price."""
    product_id = request.match_info["product_id"]
    async with request.app[TRANSACTIONS].begin() as unit:
        current = await store.get_product(unit.session, product_id, lock=True)
        if current is None:
            raise NotFound(f"no product {product_id!r}")
        price = domain.money(body.price) if body.price is not None else None
        wanted = {"name": body.name, "price": price}
        changes = {
            field: value
            for field, value in wanted.items()
            if value is not None and value != getattr(current, field)
        }
        if not changes:
            return json_response(ProductView.of(current))
        product = await store.rename_or_reprice(unit.session, product_id, changes, store.utc_now())
        assert product is not None  # locked above
        unit.publish(
            ProductUpdated(
                product_id=product.id,
                name=product.name,
                price=product.price,
                changed=sorted(changes),
            )
        )
    return json_response(ProductView.of(product))


@api.get("/inventory", response=Page[StockView], roles=STAFF)
async def list_stock(request: web.Request) -> web.Response:
    """Stock counters of every product, by product id."""
    limit, offset = page_params(request)
    async with request.app[TRANSACTIONS].db.session() as session:
        found, total = await store.list_products(session, limit, offset)
    items = [
        StockView(
            id=product.id,
            name=product.name,
            stock=product.stock,
            reserved=product.reserved,
            available=product.available,
            sold=product.sold,
        )
        for product in found
    ]
    return json_response(Page(items=items, total=total, limit=limit, offset=offset))


@api.post("/inventory/{product_id}/restock", body=Restock, response=ProductView, roles=STAFF)
async def restock(request: web.Request, body: Restock) -> web.Response:
    """Add units that arrived to a product's stock."""
    product_id = request.match_info["product_id"]
    delta = domain.restock_units(body.quantity)
    async with request.app[TRANSACTIONS].begin() as unit:
        product = await store.move_stock(unit.session, product_id, delta, store.utc_now())
        if product is None:
            raise NotFound(f"no product {product_id!r}")
        unit.publish(
            StockRestocked(
                product_id=product.id,
                quantity=body.quantity,
                stock=product.stock,
                available=product.available,
            )
        )
    return json_response(ProductView.of(product))


@api.get("/reservations/{order_id}", response=ReservationView, roles=STAFF)
async def get_reservation(request: web.Request) -> web.Response:
    """An order's reservation: its status, lines and when it expires."""
    order_id = request.match_info["order_id"]
    async with request.app[TRANSACTIONS].db.session() as session:
        reservation = await store.get_reservation(session, order_id)
    if reservation is None:
        raise NotFound(f"no reservation for order {order_id!r}")
    expires_at = None
    if reservation.status in (ReservationStatus.RESERVED, ReservationStatus.EXPIRED):
        ttl = timedelta(seconds=request.app[RESERVATION_TTL])
        expires_at = reservation.created_at + ttl
    items = [
        ReservationItemView(
            product_id=line.product_id, quantity=line.quantity, unit_price=line.unit_price
        )
        for line in reservation.lines
    ]
    view = ReservationView(
        order_id=reservation.order_id,
        status=reservation.status,
        items=items,
        total=reservation.total,
        reason=reservation.reason,
        created_at=reservation.created_at,
        expires_at=expires_at,
    )
    return json_response(view)
